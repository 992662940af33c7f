"""-r/--read FILE: captures (--write) replayed through the live outputs.

No root, no bcc, no BPF: ReplaySource is the Tracer's event source instead of the
kernel's probe. The capture already holds what the live stages learnt (owners, the
TIME_WAIT follower's ends, each namespace's name and owner's cgroup), so none of them
runs: the events go straight to the output. The filters apply here, in user space.
--lifetime builds each connection from its transitions (as Lifetimes does without
the kernel's life records); --stuck finds the sockets that stayed in a state past
its threshold by capture time (sockets/stuck.CaptureStuck).

The exit summary: the capture's own (its END record: the kernel's counts, as the live
run printed them) when no filter narrows the replay; otherwise it is built from the
matching records, with what the END record says of losses.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TextIO

from tcptrace import startup
from tcptrace.filters import Filters, describe_state_durations
from tcptrace.kernel.capfile import (
    END,
    EVENTS,
    INFO,
    KEY_FILE,
    KEY_MONOTONIC_TO_WALL,
    CaptureError,
    RecordType,
    open_captures,
)
from tcptrace.kernel.events import (
    C_FAST,
    C_SEEN,
    EVENT_STRUCT,
    F_DELTA_KNOWN,
    F_DELTA_LOWER,
    F_OWNER_KNOWN,
    F_STUCK,
    Event,
    decode_comm,
    make_event,
)
from tcptrace.kernel.stats import Summary, summary_from_json
from tcptrace.outputs.capture import END_MONO_NS, END_SUMMARY, KIND_CLOCK, KIND_PLACES
from tcptrace.outputs.output import Clock
from tcptrace.sockets.places import RecordedPlaces
from tcptrace.tracer import StopConditions, Tracer

if TYPE_CHECKING:
    from tcptrace.session import Options
    from tcptrace.sockets.stuck import CaptureStuck

_KNOWN = F_DELTA_KNOWN | F_DELTA_LOWER
NOTE_FILTERED = (
    "(replayed with filters: the table counts the capture's matching records; "
    "lost and held count the whole capture)"
)
NOTE_PART = (
    "(the capture is not whole: {why}; the table counts the records read, lost and held "
    "count the whole run)"
)
NOTE_NO_END = (
    "(the capture has no END record: its writer was stopped before the end, so "
    "nothing is known of events lost)"
)


def narrows(filters: Filters) -> bool:
    """Whether the filters leave sockets out of the summary. --state and --slower-than
    do not: live, the summary counts the transitions they do not show."""
    return replace(filters, states=frozenset(), slower_than=()) != Filters()


class EventFilter:
    """The kernel's filters, in user space, on a capture's events.

    socket(): what the summary counts (addresses, owners, namespaces, cgroups);
    shown(): of those, what the outputs show (--state, --slower-than), with how many
    --slower-than judged too fast.
    """

    def __init__(self, filters: Filters, places: RecordedPlaces) -> None:
        self.filters = filters
        self.places = places
        self.slow = filters.slow_ns() if filters.slower_than else {}
        self._netns: dict[int, bool] = {}  # inode -> whether --netns chose it
        self.faster = 0

    def _in_cgroup(self, ev: Event) -> bool:
        owned = bool(ev.flags & F_OWNER_KNOWN)
        path = self.places.of(ev.netns, ev.cgroup_id, ev.pid, owned).cgroup
        if path is None:
            return False
        for cgroup in self.filters.cgroups:
            top = cgroup.path.rstrip("/")
            if path == cgroup.path or path.startswith(top + "/"):
                return True
        return False

    def _in_netns(self, ev: Event) -> bool:
        """By inode, or by the name the capture recorded for it (its INFO record comes
        before the namespace's first event)."""
        netns = ev.netns
        found = self._netns.get(netns)
        if found is None:
            name = self.places.netns_names.get(netns)
            found = netns in self.filters.netns or name in self.filters.netns_names
            if found or name is not None:  # a namespace without a name may get one later
                self._netns[netns] = found
        return found

    def socket(self, events: list[Event]) -> list[Event]:
        f = self.filters
        if f.family:
            events = [ev for ev in events if ev.family == f.family]
        if f.ports or f.local_ports or f.remote_ports:
            match = f.matches_socket
            events = [ev for ev in events if match(ev.family, ev.sport, ev.dport)]
        if f.netns or f.netns_names:
            events = [ev for ev in events if self._in_netns(ev)]
        if f.pids:
            events = [ev for ev in events if ev.flags & F_OWNER_KNOWN and ev.pid in f.pids]
        if f.comms:
            comms = f.comms
            events = [
                ev for ev in events if ev.flags & F_OWNER_KNOWN and decode_comm(ev.comm) in comms
            ]
        if f.cgroups:
            events = [ev for ev in events if self._in_cgroup(ev)]
        return events

    def shown(self, events: list[Event]) -> list[Event]:
        f = self.filters
        if f.states:
            shows = f.shows
            events = [ev for ev in events if shows(ev.oldstate, ev.newstate)]
        if self.slow:
            slow = self.slow
            kept = [
                ev
                for ev in events
                if ev.flags & F_DELTA_KNOWN and ev.delta_ns >= slow.get(ev.oldstate, 0) > 0
            ]
            self.faster += len(events) - len(kept)
            events = kept
        return events


class ReplaySource:
    """A capture's events, batch by batch, as the Tracer polls a probe (tracer.EventSource).

    INFO records (the clock, places) and END are taken in as they come; a damaged or
    truncated file ends the replay there, its error kept in .error for after the summary.
    """

    def __init__(
        self,
        records: Iterator[tuple[RecordType, Any]],
        filters: Filters,
        missing: str | None = None,
    ) -> None:
        self._records = records
        # why the files read are not a whole run (--file-count deleted the first ones,
        # several runs): the END summary, the run's, is not theirs
        self.missing = missing
        self.places = RecordedPlaces()
        self.filter = EventFilter(filters, self.places)
        self.narrowed = narrows(filters)
        self.clock: dict[str, Any] | None = None  # the live run's (KIND_CLOCK)
        self.end: dict[str, Any] | None = None
        self.error: CaptureError | None = None
        self._pending: deque[bytes] = deque()  # EVENTS payloads read ahead
        self._done = False
        self.records_read = 0  # events, matching or not
        self._built = Summary()  # from the records the filters let through
        # --stuck: the sockets past their thresholds, found in the transitions as read
        self.stuck: CaptureStuck | None = None
        self.transitions = True  # False: --stuck alone, its reports only
        self._batches: deque[list[Event]] = deque()  # split by stuck, not handed on yet

    def _next(self) -> tuple[RecordType, Any] | None:
        if self._done:
            return None
        try:
            item = next(self._records, None)
        except CaptureError as exc:
            self.error = exc
            item = None
        if item is None:
            self._done = True
        return item

    def _take(self, rtype: RecordType, value: Any) -> bytes | None:
        """An EVENTS payload, or None after taking in any other record."""
        if rtype == EVENTS:
            return value
        if rtype == INFO:
            kind = value.get("kind")
            if kind == KIND_PLACES:
                # a damaged place row: its socket shows its inode only
                with contextlib.suppress(TypeError, ValueError):
                    self.places.add(value.get("rows", []))
            elif kind == KIND_CLOCK and self.clock is None:
                self.clock = value
        elif rtype == END:
            self.end = value
            end_ns = value.get(END_MONO_NS) if isinstance(value, dict) else None
            if self.stuck is not None and isinstance(end_ns, int):
                # the sockets that crossed after the last transition, before tracing stopped
                reports = self.stuck.finish(end_ns)
                if reports:
                    self._batches.append(reports)
        return None

    def prime(self) -> None:
        """Read up to the first events (the clock and places that precede them)."""
        while not self._pending:
            item = self._next()
            if item is None:
                return
            raw = self._take(*item)
            if raw:
                self._pending.append(raw)

    def _next_payload(self) -> bytes | None:
        if self._pending:
            return self._pending.popleft()
        while True:
            item = self._next()
            if item is None:
                return None
            raw = self._take(*item)
            if raw:
                return raw

    def poll_events(self, timeout_ms: int) -> list[Event]:
        while True:
            if self._batches:
                return self._batches.popleft()
            raw = self._next_payload()
            if raw is None:
                return []
            events = list(map(make_event, EVENT_STRUCT.iter_unpack(raw)))
            self.records_read += len(events)
            events = self.filter.socket(events)
            record = self._built.record
            for ev in events:
                record(ev.oldstate, ev.newstate, ev.delta_ns, ev.flags & _KNOWN == F_DELTA_KNOWN)
            if self.stuck is not None:
                # every transition of the chosen sockets goes through it; of the batches
                # it makes, the reports' go on whole and the others as shown
                for batch in self.stuck.split(events):
                    if not batch[0].flags & F_STUCK:
                        batch = self.filter.shown(batch) if self.transitions else []
                    if batch:
                        self._batches.append(batch)
                continue
            events = self.filter.shown(events)
            if events:
                return events

    def poll(self, timeout_ms: int) -> list[bytes]:  # EventSource's; poll_events serves
        return []

    def exhausted(self) -> bool:
        return self._done and not self._pending and not self._batches

    def summary(self) -> Summary:
        """The capture's summary (END), or one built from the matching records."""
        while self.end is None and not self._done:  # stopped early (--count): find END
            item = self._next()
            if item is not None and item[0] != EVENTS:
                self._take(*item)
        end = self.end
        saved = end.get(END_SUMMARY) if end is not None else None
        whole: Summary | None = None
        if isinstance(saved, dict):
            try:
                whole = summary_from_json(saved)
            except (KeyError, TypeError, ValueError, AttributeError):
                whole = None
        if whole is not None and not self.narrowed and self.missing is None:
            summary = whole
        else:
            summary = self._built
            if whole is not None:
                summary.counters = list(whole.counters)
                summary.lost, summary.unread, summary.held = whole.lost, whole.unread, whole.held
                summary.missed, summary.slower_than = whole.missed, whole.slower_than
                if self.missing is not None:
                    summary.notes.append(NOTE_PART.format(why=self.missing))
                else:
                    summary.notes.append(NOTE_FILTERED)
            else:
                summary.notes.append(NOTE_NO_END)
            summary.counters[C_SEEN] = summary.total_transitions
        if self.filter.slow:
            # judged here: too fast to show, as the kernel counts them live
            summary.counters[C_FAST] += self.filter.faster
            summary.slower_than = describe_state_durations(self.filter.filters.slower_than)
        return summary


def missing_files(metas: list[dict[str, Any]]) -> str | None:
    """Why captures (their headers, in reading order) are not one whole run, or None."""
    runs: dict[str, list[int]] = {}
    for meta in metas:
        part = meta.get(KEY_FILE)
        part = part if isinstance(part, dict) else {}
        runs.setdefault(str(part.get("run")), []).append(part.get("index", 0))
    if len(runs) > 1:
        return f"{len(runs)} runs"
    (indexes,) = runs.values()
    if indexes != list(range(len(indexes))):
        first = indexes[0] if indexes and isinstance(indexes[0], int) else 0
        if first > 0 and indexes == list(range(first, first + len(indexes))):
            files = "file is" if first == 1 else f"{first} files are"
            return f"its first {files} gone (--file-count)"
        return "files of its run are missing"
    return None


def replay_clock(style: str, meta: dict[str, Any], clock: dict[str, Any] | None) -> Clock:
    """The live run's clock: as its outputs had it (KIND_CLOCK), else from the header."""
    offset = meta.get(KEY_MONOTONIC_TO_WALL)
    offset = offset if isinstance(offset, int) else 0
    part = meta.get(KEY_FILE)
    started = part.get("run_started_wall_ns") if isinstance(part, dict) else None
    start = started - offset if isinstance(started, int) else 0
    if clock is not None:
        got_start, got_offset = clock.get("start_mono_ns"), clock.get("offset_ns")
        if isinstance(got_start, int) and isinstance(got_offset, int):
            start, offset = got_start, got_offset
    return Clock(style, start, offset)


def replay(options: Options, out: TextIO, err: TextIO) -> int:
    """-r: the captures through the outputs these options choose; the exit code."""
    from tcptrace.session import build_stages, stop_after_lifetimes

    # --lifetime: --state chooses whole connections (the output's tracker decides),
    # and --count counts them
    chosen = replace(options.filters, states=frozenset()) if options.lifetime else options.filters
    count = None if options.lifetime else options.count
    with open_captures(options.read) as captures:
        missing = missing_files([reader.meta for reader in captures.readers])
        source = ReplaySource(captures.records(), chosen, missing)
        source.prime()
        clock = replay_clock(options.timestamp, captures.meta, source.clock)
        watch = None
        if options.stuck:
            from tcptrace.sockets.stuck import CaptureStuck

            watch = source.stuck = CaptureStuck(options.stuck)
            source.transitions = options.transitions
        stages = build_stages(
            replace(options, clock=clock, places=source.places), out, err, capture_stuck=watch
        )
        tracer = Tracer(source, stages, StopConditions(count, options.duration))
        if options.lifetime and options.count is not None:
            stop_after_lifetimes(stages, options.count, tracer.request_stop)
        tracer.install_signals()
        try:
            tracer.run()
        except BrokenPipeError:
            startup.reader_gone(out, err)
            return 0
        finally:
            for stage in stages:
                close = getattr(stage, "close", None)
                if close is not None:
                    close()
    if source.error is not None:
        out.flush()
        raise source.error
    return 0


def stdin_is_terminal() -> bool:
    """-r -: a capture cannot come from a terminal."""
    try:
        return os.isatty(sys.stdin.fileno())
    except (OSError, ValueError):
        return False
