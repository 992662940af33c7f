"""--write FILE: the output stage that saves each batch as the kernel's own records.

It sits where --json's RecordOutput would: the events it gets are enriched (owners
found in /proc or by sock_diag) and TIME_WAIT followed (the ends the follower made),
so the capture holds what the live outputs would have shown. Each batch becomes one
EVENTS record, packed in bulk in struct tcptrace_event's layout. At exit it writes
what a replay cannot learn again (INFO: each namespace's name and each owner's cgroup
path, as the NETNS and CGROUP columns get them) and the exit summary (END), then
prints the summary on stderr, as --csv does.

The format: docs/capture-format.md (kernel/capfile.py).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import time
from typing import Any, TextIO

from tcptrace.kernel.capfile import CaptureError, CaptureWriter, RotatingWriter
from tcptrace.kernel.events import EVENT_STRUCT, F_OWNER_KNOWN, F_STUCK, Event
from tcptrace.kernel.stats import Summary, summary_to_json
from tcptrace.outputs.hist import format_hist
from tcptrace.outputs.output import Clock, format_summary
from tcptrace.sockets.places import Places, place_key
from tcptrace.stages import Stage

# INFO record kinds
# {"rows": [[netns, cgroup_id, pid, netns_name, cgroup, container], ...]}: the NETNS and
# CGROUP columns' places (sockets/places.place_key's keys), before the first event of each
KIND_PLACES = "places"
# {"style", "start_mono_ns", "offset_ns"}: the outputs' clock of the live run (-T)
KIND_CLOCK = "clock"
# The END record's keys
END_SUMMARY = "summary"  # kernel/stats.summary_to_json of the exit summary
END_WRITTEN = "written"  # transitions written (what the live output would have shown)
END_MONO_NS = "end_mono_ns"  # when tracing stopped (CLOCK_MONOTONIC, as the events' ts_ns)

_pack = EVENT_STRUCT.pack


def pack_events(events: list[Event]) -> bytes:
    """Events back into the kernel's layout, end to end (Event's fields are
    struct tcptrace_event's, in order: tests/outputs/test_capture.py holds them so)."""
    return b"".join(itertools.starmap(_pack, events))


class CaptureOutput(Stage):
    """Each batch as one EVENTS record; at exit INFO (places) and END (the summary)."""

    def __init__(
        self,
        writer: CaptureWriter | RotatingWriter,
        name: str,
        err: TextIO,
        hist: bool = False,
        places: Places | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.writer = writer
        self.name = name  # the file, as the user named it, for the error line
        self.err = err
        self.hist = hist
        self.places = places if places is not None else Places()
        self.clock = clock or Clock.now("wall")
        self.written = 0
        # place_key -> [netns, cgroup_id, pid, netns_name, cgroup, container]
        self._places: dict[tuple[int, int, int], list[Any]] = {}

    def _preamble(self, rows: list[list[Any]]) -> None:
        """What each file of a rotation needs to be read alone: the clock, the places."""
        clock = self.clock
        self.writer.info(
            {
                "kind": KIND_CLOCK,
                "style": clock.style,
                "start_mono_ns": clock.start_mono_ns,
                "offset_ns": clock.offset_ns,
            }
        )
        if rows:
            self.writer.info({"kind": KIND_PLACES, "rows": rows})

    def on_start(self) -> None:
        try:
            self._preamble([])
        except OSError as exc:
            raise self._failed(exc) from None

    def _failed(self, exc: OSError) -> CaptureError:
        what = "the reader went away" if exc.errno == errno.EPIPE else exc.strerror or str(exc)
        records = self.writer.records_written
        if not records:  # the first record: nothing written
            return CaptureError(f"{self.name}: cannot write: {what}")
        return CaptureError(
            f"{self.name}: cannot write: {what}; the {records} whole records "
            "written before stay readable"
        )

    def _learn_places(self, events: list[Event]) -> list[list[Any]]:
        """The places of this batch not recorded yet, looked up now, while their owners
        run (a place from /proc/PID/cgroup goes with its process)."""
        known = self._places
        new = []
        keys = {(ev.netns, ev.cgroup_id, ev.pid, ev.flags & F_OWNER_KNOWN) for ev in events}
        for netns, cgroup_id, pid, owned in keys:
            key = place_key(netns, cgroup_id, pid, bool(owned))
            if key in known or not (netns or cgroup_id or key[2]):
                continue
            place = self.places.of(netns, cgroup_id, pid, bool(owned))
            row = [*key, place.netns_name, place.cgroup, place.container]
            if place.complete:
                known[key] = row  # (else asked again with the next batch)
            new.append(row)
        return new

    def on_events(self, events: list[Event]) -> None:
        if not events or events[0].flags & F_STUCK:
            return
        writer = self.writer
        raw = pack_events(events)
        new = self._learn_places(events)
        try:
            if getattr(writer, "starts_new_file", False):
                self._preamble(list(self._places.values()))  # a new file of a rotation
            elif new:
                writer.info({"kind": KIND_PLACES, "rows": new})
            writer.events(raw)
            writer.flush()  # a pipe's reader gets each batch now (files: unbuffered)
        except OSError as exc:
            raise self._failed(exc) from None
        self.written += len(events)

    def on_finish(self, summary: Summary) -> None:
        try:
            self.writer.end(
                {
                    END_SUMMARY: summary_to_json(summary),
                    END_WRITTEN: self.written,
                    END_MONO_NS: time.monotonic_ns(),
                }
            )
            self.writer.flush()
        except OSError as exc:
            raise self._failed(exc) from None
        self.err.write(format_summary(summary, self.written))
        if self.hist:
            self.err.write("\n" + format_hist(summary))
        self.err.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already said by on_events or on_finish
            self.writer.close()
