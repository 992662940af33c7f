"""The data path's loop: poll the perf buffer, decode, hand batches to the stages.

bpf -> perf buffer (loader.Probe) -> decode (events) -> stages (tracking, output).
Stops on --count, --duration, SIGTERM or Ctrl-C; a second Ctrl-C exits at once (130).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from tcptrace.errors import EXIT_INTERRUPTED
from tcptrace.kernel.events import F_ACCEPTED, Event, decode_many
from tcptrace.kernel.stats import Summary
from tcptrace.stages import Stage

# Longest wait for events before the loop looks at its stop conditions again;
# also the bound on how late a transition is printed at low rates.
POLL_MS = 50
# The same where no line follows each transition (--quiet, --stuck alone, --metrics
# alone): the ticks' work is what it waits for, and it needs no finer grain than the
# TIME_WAIT follower's fastest poll (timewait.FAST_POLL_INTERVAL) or the shortest
# --stuck scan (stuck.MIN_SCAN_S). Half the wake-ups of an idle watcher.
QUIET_POLL_MS = 100
# Longest rest the CPU budget imposes between reads.
MAX_REST_S = 0.05
# Events in one batch before its CPU time is trusted as a cost per event.
MIN_COST_SAMPLE = 500
# Allocations between young-generation collections while tracing (Python's default: 700).
GC_THRESHOLD = 50_000
# Seconds between full collections while tracing: pyroute2's requests leave
# reference cycles that the collector's own pace would let pile up for minutes.
GC_FULL_INTERVAL = 5.0


class EventSource(Protocol):
    """Raw records from poll(); a source may also offer poll_events() -> list[Event],
    and exhausted() -> bool: True once it has nothing more to give (a replay's end of
    file), when the loop stops as at --count."""

    def poll(self, timeout_ms: int) -> list[bytes]: ...

    def summary(self) -> Summary: ...


def leave_now() -> None:
    """Second Ctrl-C: exit at once with 130, even from a write blocked on a full pipe.

    No unwinding (an exception could surface anywhere, even in clean-up) and no
    flushing (stdout may be the pipe that blocks): the kernel detaches the program
    and frees its maps when the process's descriptors close.
    """
    with contextlib.suppress(OSError):
        os.write(2, b"tcptrace: interrupted twice: exiting without the summary\n")
    os._exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Collect garbage less often while events stream.

    Every event is a new tuple; at the default pace the collector scans the young
    generation every 700 of them, about 15% of the per-event cost, though events
    form no cycles. What start-up made is frozen out of the scans altogether.
    """
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


@dataclass
class StopConditions:
    count: int | None = None  # stop after this many events
    duration: float | None = None  # seconds


class Tracer:
    def __init__(
        self,
        source: EventSource,
        stages: list[Stage],
        stop: StopConditions,
        cpu_budget: float | None = None,
        poll_ms: int = POLL_MS,
    ) -> None:
        self.source = source
        self.poll_ms = poll_ms
        self.stages = stages
        self.conditions = stop
        self.stopping = threading.Event()
        self.handled = 0
        self.started = False  # start() ran
        # share of one CPU the loop may use (None: as much as it needs); above it
        # the loop rests, the kernel sheds what does not fit and counts it
        self.cpu_budget = cpu_budget
        self._cost: float | None = None  # CPU seconds per handled event (moving average)

    def request_stop(self, *_args: object) -> None:
        self.stopping.set()

    def install_signals(self) -> None:
        def on_sigint(_signum: int, _frame: object) -> None:
            if self.stopping.is_set():
                leave_now()
            self.stopping.set()

        signal.signal(signal.SIGINT, on_sigint)
        signal.signal(signal.SIGTERM, self.request_stop)

    def _dispatch(self, events: list[Event], first: int = 0) -> None:
        for stage in self.stages[first:]:
            replaced = stage.on_events(events)
            if replaced is not None:
                events = replaced

    def _tick(self) -> None:
        now = time.monotonic_ns()
        for index, stage in enumerate(self.stages):
            made = stage.on_tick(now)
            if made:
                self._dispatch(made, index + 1)

    def _poll(self, timeout_ms: int) -> list[Event]:
        # a source that decodes whole batches itself (loader.Probe) skips decode_many
        poll_events = getattr(self.source, "poll_events", None)
        if poll_events is not None:
            return poll_events(timeout_ms)
        raw = self.source.poll(timeout_ms)
        return list(decode_many(raw)) if raw else []

    def _handle(self, events: list[Event]) -> None:
        if not events:
            return
        limit = self.conditions.count
        if limit is None:
            self.handled += len(events)
        else:
            # transitions only: an accept record (F_ACCEPTED) goes with them uncounted
            room = limit - self.handled
            counted = [i for i, ev in enumerate(events) if not ev.flags & F_ACCEPTED]
            if len(counted) >= room:
                events = events[: counted[room - 1] + 1] if room > 0 else []
                self.stopping.set()
            self.handled += min(len(counted), room)
        self._dispatch(events)

    def _drain(self) -> None:
        """Stop the kernel side, then hand on what is still buffered.

        Afterwards every traced transition was either handled or counted lost,
        so the summary's accounting adds up (traced == shown + lost).
        """
        detach = getattr(self.source, "detach", None)
        if detach is None:
            return
        detach()
        while True:  # each read takes a bounded batch; nothing new arrives now
            events = self._poll(0)
            if not events:
                break
            if self.conditions.count is not None and self.handled >= self.conditions.count:
                continue  # --count reached: read what is left, show none of it
            self._handle(events)

    def _rest(self, cpu_used: float, handled: int) -> None:
        """Keep the loop within its CPU budget.

        A source that can limit its rate (loader.Probe: the kernel sheds the
        excess and counts it) is told how many events a second the budget pays
        for, from the measured CPU cost per event. Otherwise, or while the cost
        is still unknown, the loop rests, at most MAX_REST_S so that printing
        stays within about 100 ms of the transitions.
        """
        if not self.cpu_budget or cpu_used <= 0:
            return
        set_rate = getattr(self.source, "set_rate_limit", None)
        if handled >= MIN_COST_SAMPLE:
            cost = cpu_used / handled
            self._cost = cost if self._cost is None else 0.8 * self._cost + 0.2 * cost
            if set_rate is not None:
                set_rate(self.cpu_budget / self._cost)
                return
        if set_rate is None or self._cost is None:
            rest = min(cpu_used * (1 / self.cpu_budget - 1), MAX_REST_S)
            self.stopping.wait(rest)

    def start(self) -> None:
        """Start every stage (once): the start-up snapshot, which hands older listeners
        to the kernel, is taken before the caller says tracing has begun."""
        if self.started:
            return
        self.started = True
        for stage in self.stages:
            stage.on_start()

    def run(self) -> Summary:
        """Trace until a stop condition, then finish every stage; return the summary."""
        with fewer_collections():
            return self._run()

    def _run(self) -> Summary:
        self.start()
        deadline = time.monotonic() + self.conditions.duration if self.conditions.duration else None
        next_collection = time.monotonic() + GC_FULL_INTERVAL
        exhausted = getattr(self.source, "exhausted", None)
        while not self.stopping.is_set():
            timeout = self.poll_ms
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                timeout = max(1, min(timeout, int(left * 1000)))
            # (the process's CPU clock is a system call: read only for --max-cpu)
            cpu_before = time.process_time() if self.cpu_budget else 0.0
            handled_before = self.handled
            self._handle(self._poll(timeout))
            self._tick()
            if exhausted is not None and exhausted():
                break
            if self.cpu_budget:
                self._rest(time.process_time() - cpu_before, self.handled - handled_before)
            if time.monotonic() >= next_collection:
                gc.collect()  # ~10 ms: the live objects are few, start-up's are frozen
                next_collection = time.monotonic() + GC_FULL_INTERVAL
        self._drain()
        now = time.monotonic_ns()
        for index, stage in enumerate(self.stages):
            made = stage.on_drained(now)
            if made:
                self._dispatch(made, index + 1)
        summary = self.source.summary()
        for stage in self.stages:
            stage.on_finish(summary)
        return summary
