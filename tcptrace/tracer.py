"""The data path's loop: poll the perf buffer, decode, hand batches to the sinks.

bpf -> perf buffer (loader.Probe) -> decode (events) -> sinks (output, tracking).
Stops on --count, --duration, SIGTERM or Ctrl-C; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from tcptrace.events import Event, decode_many

# Longest wait for events before the loop looks at its stop conditions again;
# also the bound on how late a transition is printed at low rates.
POLL_MS = 50


class EventSource(Protocol):
    def poll(self, timeout_ms: int) -> list[bytes]: ...


Sink = Callable[[list[Event]], None]


@dataclass
class StopConditions:
    count: int | None = None  # stop after this many events
    duration: float | None = None  # seconds


class Tracer:
    def __init__(self, source: EventSource, sink: Sink, stop: StopConditions) -> None:
        self.source = source
        self.sink = sink
        self.conditions = stop
        self.stopping = threading.Event()
        self.handled = 0

    def request_stop(self, *_args: object) -> None:
        self.stopping.set()

    def install_signals(self) -> None:
        def on_sigint(_signum: int, _frame: object) -> None:
            if self.stopping.is_set():
                raise KeyboardInterrupt  # second Ctrl-C: leave now
            self.stopping.set()

        signal.signal(signal.SIGINT, on_sigint)
        signal.signal(signal.SIGTERM, self.request_stop)

    def run(self) -> int:
        deadline = time.monotonic() + self.conditions.duration if self.conditions.duration else None
        limit = self.conditions.count
        while not self.stopping.is_set():
            timeout = POLL_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                timeout = max(1, min(timeout, int(left * 1000)))
            raw = self.source.poll(timeout)
            if not raw:
                continue
            events = list(decode_many(raw))
            if limit is not None and self.handled + len(events) >= limit:
                events = events[: limit - self.handled]
                self.handled += len(events)
                self.sink(events)
                break
            self.handled += len(events)
            self.sink(events)
        return self.handled
