"""--write's stage: batches as EVENTS records in the kernel's layout, INFO, END."""

from __future__ import annotations

import errno
import io

import pytest

from tcptrace.kernel import capfile
from tcptrace.kernel.capfile import CaptureError, CaptureReader, CaptureWriter
from tcptrace.kernel.events import EVENT_FIELDS, EVENT_STRUCT, F_OWNER_KNOWN, Event, make_event
from tcptrace.kernel.stats import Summary, summary_from_json, summary_to_json
from tcptrace.outputs.capture import (
    END_SUMMARY,
    END_WRITTEN,
    KIND_CLOCK,
    KIND_PLACES,
    CaptureOutput,
    pack_events,
)
from tcptrace.outputs.output import Clock
from tcptrace.sockets.places import Place, RecordedPlaces
from tcptrace.states import TcpState
from tests.outputs.test_output import make_event as an_event


def test_event_fields_are_the_kernel_records_in_order():
    assert Event._fields == tuple(name for name, _type, _n in EVENT_FIELDS)


def test_pack_events_is_the_kernels_layout_end_to_end():
    events = [an_event(), an_event(TcpState.ESTABLISHED, TcpState.FIN_WAIT1, sport=1, pid=9)]
    raw = pack_events(events)
    assert len(raw) == 2 * EVENT_STRUCT.size
    assert [make_event(f) for f in EVENT_STRUCT.iter_unpack(raw)] == events


class FakePlaces:
    def __init__(self):
        self.asked = []

    def of(self, netns, cgroup_id, pid, owner_known):
        self.asked.append((netns, cgroup_id, pid, owner_known))
        return Place(netns or None, "blue", "/system.slice/x.service", None)


def records_of(buf: io.BytesIO) -> list:
    return list(CaptureReader(io.BytesIO(buf.getvalue()), "t.cap").records())


def test_each_batch_is_one_events_record_then_end_with_the_summary():
    buf, err = io.BytesIO(), io.StringIO()
    places = FakePlaces()
    stage = CaptureOutput(
        CaptureWriter(buf, {}), "t.cap", err, places=places, clock=Clock("wall", 7, 11)
    )
    stage.on_start()
    batch = [an_event(netns=4026531840), an_event(netns=4026531840, sport=2)]
    stage.on_events(batch)
    stage.on_events([an_event(netns=4026531840, sport=3)])
    summary = Summary()
    summary.record(TcpState.SYN_SENT, TcpState.ESTABLISHED, 437_200, True)
    summary.held = 2
    stage.on_finish(summary)
    got = records_of(buf)
    kinds = [(t, v.get("kind") if isinstance(v, dict) else len(v)) for t, v in got]
    assert kinds == [
        (capfile.INFO, KIND_CLOCK),
        (capfile.INFO, KIND_PLACES),  # before the first event of that place
        (capfile.EVENTS, 2 * EVENT_STRUCT.size),
        (capfile.EVENTS, EVENT_STRUCT.size),  # its place is known: no INFO again
        (capfile.END, None),
    ]
    assert got[0][1] == {"kind": KIND_CLOCK, "style": "wall", "start_mono_ns": 7, "offset_ns": 11}
    assert got[1][1]["rows"] == [[4026531840, 0, 2588, "blue", "/system.slice/x.service", None]]
    assert places.asked == [(4026531840, 0, 2588, True)]
    end = got[-1][1]
    assert end[END_WRITTEN] == 3
    assert summary_from_json(end[END_SUMMARY]) == summary
    # the summary on stderr, as --csv's
    assert "3 shown" in err.getvalue() and "2 held" in err.getvalue()


def test_a_full_disk_is_one_capture_error_and_what_was_written_stays_readable():
    class Full(io.BytesIO):
        fail = False

        def write(self, data):
            if self.fail:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    buf = Full()
    stage = CaptureOutput(CaptureWriter(buf, {}), "t.cap", io.StringIO(), places=FakePlaces())
    stage.on_start()
    stage.on_events([an_event()])
    buf.fail = True
    with pytest.raises(CaptureError, match=r"t\.cap: cannot write: No space left on device"):
        stage.on_events([an_event()])
    assert [t for t, _ in records_of(buf)] == [capfile.INFO, capfile.INFO, capfile.EVENTS]


def test_summary_json_round_trip_keeps_what_the_exit_summary_prints():
    summary = Summary(slower_than="1s", lost=3, unread=1, held=2, missed=4, sockets_tracked=5)
    summary.record(TcpState.ESTABLISHED, TcpState.FIN_WAIT1, 30_000_000, True)
    summary.record(TcpState.ESTABLISHED, TcpState.FIN_WAIT1, 0, False)
    summary.record(TcpState.CLOSE, TcpState.SYN_SENT, 0, False)
    summary.counters[0] = 3
    summary.remark("still_in_time_wait", 2, "2 sockets still in TIME_WAIT")
    import json

    assert summary_from_json(json.loads(json.dumps(summary_to_json(summary)))) == summary


def test_recorded_places_answer_from_the_capture_only():
    places = RecordedPlaces()
    places.add([[5, 0, 42, "blue", "/a", None], [6, 9, 0, None, "/b/c", "abc"]])
    assert places.of(5, 0, 42, True).netns_name == "blue"
    assert places.of(6, 9, 77, True).cgroup == "/b/c"  # a cgroup id: the pid plays no part
    unknown = places.of(7, 0, 1, bool(F_OWNER_KNOWN))
    assert (unknown.netns, unknown.netns_name, unknown.cgroup) == (7, None, None)
