"""-r's event source: batches from a capture, filters in user space, the summary."""

from __future__ import annotations

import io

import pytest

from tcptrace.filters import Filters
from tcptrace.kernel.capfile import CaptureError, CaptureReader, CaptureWriter
from tcptrace.kernel.events import C_SEEN, F_DELTA_KNOWN, F_OWNER_KNOWN
from tcptrace.kernel.stats import Summary, summary_to_json
from tcptrace.outputs.capture import END_SUMMARY, KIND_CLOCK, pack_events
from tcptrace.replay import ReplaySource, replay_clock
from tcptrace.stages import Stage
from tcptrace.states import TcpState
from tcptrace.tracer import StopConditions, Tracer
from tests.outputs.test_output import make_event

S = TcpState


def capture(*batches, end: Summary | None = None, clock=None) -> bytes:
    buf = io.BytesIO()
    writer = CaptureWriter(buf, {"monotonic_to_wall_ns": 100})
    if clock:
        writer.info({"kind": KIND_CLOCK, **clock})
    for batch in batches:
        writer.events(pack_events(batch))
    if end is not None:
        writer.end({END_SUMMARY: summary_to_json(end)})
    return buf.getvalue()


def source(data: bytes, filters: Filters | None = None) -> ReplaySource:
    reader = CaptureReader(io.BytesIO(data), "t.cap")
    return ReplaySource(reader.records(), filters or Filters())


class Collect(Stage):
    def __init__(self):
        self.events = []
        self.summary = None

    def on_events(self, events):
        self.events.extend(events)

    def on_finish(self, summary):
        self.summary = summary


def replay(src: ReplaySource, count=None) -> Collect:
    sink = Collect()
    Tracer(src, [sink], StopConditions(count)).run()  # returns: the source ran out
    return sink


def test_the_tracer_stops_when_the_capture_ends_and_the_summary_is_the_captures():
    end = Summary()
    end.counters[C_SEEN] = 99
    a, b = make_event(sport=1), make_event(sport=2)
    sink = replay(source(capture([a], [b], end=end)))
    assert sink.events == [a, b]
    assert sink.summary == end  # no filter: the live run's, exactly


def test_filters_in_user_space_and_a_summary_built_from_the_matching_records():
    end = Summary(lost=5)
    end.counters[C_SEEN] = 99
    fast = make_event(S.SYN_SENT, S.ESTABLISHED, delta=1000, sport=1)
    slow = make_event(S.ESTABLISHED, S.FIN_WAIT1, delta=2_000_000, sport=1)
    other = make_event(S.ESTABLISHED, S.FIN_WAIT1, delta=2_000_000, sport=7)
    filters = Filters(local_ports=frozenset({1}), slower_than=((0, 1_000_000),))
    sink = replay(source(capture([fast, slow, other], end=end), filters))
    assert sink.events == [slow]
    summary = sink.summary
    assert summary.counters[C_SEEN] == 2  # the matching records (port 1)
    assert summary.faster == 1 and summary.slower_than
    assert summary.lost == 5  # the whole capture's
    assert summary.state(S.ESTABLISHED).count == 1
    assert any("replayed with filters" in note for note in summary.notes)


def test_owner_filters_need_a_known_owner():
    known = make_event(pid=7, flags=F_DELTA_KNOWN | F_OWNER_KNOWN)
    unknown = make_event(pid=7, flags=F_DELTA_KNOWN)
    sink = replay(source(capture([known, unknown]), Filters(pids=frozenset({7}))))
    assert sink.events == [known]
    sink = replay(source(capture([known, unknown]), Filters(comms=frozenset({"curl"}))))
    assert sink.events == [known]


def test_a_truncated_capture_gives_what_it_holds_then_its_error():
    data = capture([make_event()], [make_event(sport=9)])
    src = source(data[:-10])
    sink = replay(src)
    assert sink.events == [make_event()]
    assert any("no END record" in note for note in sink.summary.notes)
    assert isinstance(src.error, CaptureError) and "truncated" in str(src.error)


def test_count_stops_early_and_the_summary_is_still_the_captures():
    end = Summary()
    end.counters[C_SEEN] = 3
    events = [make_event(sport=n) for n in range(3)]
    sink = replay(source(capture(events[:2], events[2:], end=end)), count=1)
    assert sink.events == events[:1]
    assert sink.summary == end


def test_the_clock_is_the_live_runs():
    data = capture([make_event()], clock={"style": "wall", "start_mono_ns": 5, "offset_ns": 6})
    src = source(data)
    src.prime()
    clock = replay_clock("relative", {"monotonic_to_wall_ns": 100}, src.clock)
    assert (clock.style, clock.start_mono_ns, clock.offset_ns) == ("relative", 5, 6)
    header_only = replay_clock("wall", {"monotonic_to_wall_ns": 100, "file": {}}, None)
    assert header_only.offset_ns == 100


@pytest.mark.parametrize("empty", [True, False])
def test_an_empty_capture_replays_nothing(empty):
    sink = replay(source(capture(end=None if empty else Summary())))
    assert sink.events == []


def test_netns_and_cgroup_filters_use_what_the_capture_recorded():
    from tcptrace.cli import _replay_cgroup
    from tcptrace.outputs.capture import KIND_PLACES

    here = make_event(netns=11, cgroup_id=5, sport=1)
    there = make_event(netns=12, cgroup_id=6, sport=2)
    buf = io.BytesIO()
    writer = CaptureWriter(buf, {})
    writer.info(
        {"kind": KIND_PLACES, "rows": [[11, 5, 0, None, "/system.slice/a.service", None],
                                       [12, 6, 0, None, "/system.slice/ab.service", None]]}
    )  # fmt: skip
    writer.events(pack_events([here, there]))
    data = buf.getvalue()
    assert replay(source(data, Filters(netns=frozenset({12})))).events == [there]
    cgroup = _replay_cgroup("system.slice/a.service/")
    assert cgroup.path == "/system.slice/a.service"
    assert replay(source(data, Filters(cgroups=(cgroup,)))).events == [here]
    top = _replay_cgroup("/system.slice")
    assert replay(source(data, Filters(cgroups=(top,)))).events == [here, there]


def test_netns_by_the_name_the_capture_recorded():
    """-r --netns blue: the ip netns name the capture's INFO recorded for an inode
    (for any socket there, whatever its owner), not this host's namespaces."""
    from tcptrace.outputs.capture import KIND_PLACES

    blue = make_event(netns=11, cgroup_id=5, sport=1)
    blue_unowned = make_event(netns=11, cgroup_id=0, sport=3)
    red = make_event(netns=12, cgroup_id=6, sport=2)
    buf = io.BytesIO()
    writer = CaptureWriter(buf, {})
    writer.info({"kind": KIND_PLACES, "rows": [[11, 5, 0, "blue", None, None]]})
    writer.events(pack_events([blue, red]))
    writer.info({"kind": KIND_PLACES, "rows": [[12, 6, 0, "red", None, None]]})
    writer.events(pack_events([blue_unowned, red]))
    data = buf.getvalue()
    chosen = replay(source(data, Filters(netns_names=frozenset({"blue"})))).events
    assert chosen == [blue, blue_unowned]
    both = Filters(netns=frozenset({12}), netns_names=frozenset({"blue"}))
    assert replay(source(data, both)).events == [blue, red, blue_unowned, red]
    # red had no name when its first socket came: chosen once it has one
    assert replay(source(data, Filters(netns_names=frozenset({"red"})))).events == [red]


def test_state_and_slower_than_keep_the_captures_summary_as_live():
    end = Summary()
    end.counters[C_SEEN] = 7
    fast = make_event(S.SYN_SENT, S.ESTABLISHED, delta=1000)
    slow = make_event(S.ESTABLISHED, S.FIN_WAIT1, delta=2_000_000)
    data = capture([fast, slow], end=end)
    sink = replay(source(data, Filters(states=frozenset({S.FIN_WAIT1}))))
    assert sink.events == [slow]
    assert sink.summary == end  # live, --state does not change the summary either
    sink = replay(source(data, Filters(slower_than=((0, 1_000_000),))))
    assert sink.events == [slow]
    assert sink.summary.counters[C_SEEN] == 7 and sink.summary.faster == 1
    assert sink.summary.slower_than == "1ms" and not sink.summary.notes


def test_files_that_are_not_a_whole_run_get_a_summary_of_their_own():
    from tcptrace.replay import missing_files

    def meta(run, index):
        return {"file": {"run": run, "index": index}}

    assert missing_files([meta("a", 0), meta("a", 1)]) is None
    assert (
        missing_files([meta("a", 2), meta("a", 3)]) == "its first 2 files are gone (--file-count)"
    )
    assert missing_files([meta("a", 1)]) == "its first file is gone (--file-count)"
    assert missing_files([meta("a", 0), meta("a", 2)]) == "files of its run are missing"
    assert missing_files([meta("a", 0), meta("b", 0)]) == "2 runs"
    end = Summary()
    end.counters[C_SEEN] = 50
    ev = make_event()
    reader = CaptureReader(io.BytesIO(capture([ev], end=end)), "t.cap")
    sink = replay(ReplaySource(reader.records(), Filters(), "its first file is gone"))
    assert sink.summary.counters[C_SEEN] == 1
    assert "not whole: its first file is gone" in sink.summary.notes[0]


def test_a_write_to_a_file_does_not_watch_the_pipe_it_does_not_write():
    import os

    from tcptrace.outputs.capture import CaptureOutput
    from tcptrace.pipes import PipeWatch
    from tcptrace.session import Options, build_stages

    read_fd, write_fd = os.pipe()
    try:
        with os.fdopen(write_fd, "w", closefd=False) as out:
            writer = CaptureWriter(io.BytesIO(), {})
            for target, watched in (("t.cap", False), ("-", True)):
                stages = build_stages(Options(write=target), out, io.StringIO(), writer=writer)
                assert isinstance(stages[0], CaptureOutput)
                assert any(isinstance(s, PipeWatch) for s in stages) == watched
    finally:
        os.close(read_fd)
        os.close(write_fd)
