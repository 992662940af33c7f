"""Telling the user on stderr, while tracing and at exit, that events were lost.

The summary on stdout counts losses too, but stdout may be the slow pipe that
caused them: stderr is where a person or a supervisor notices.
"""

from __future__ import annotations

from typing import Protocol, TextIO

from tcptrace.kernel.stats import Summary
from tcptrace.stages import Stage

# At most one live report per interval, and only when the count grew.
REPORT_INTERVAL_NS = 1_000_000_000

ADVICE = (
    "the output did not keep up (per-state statistics stay exact; a faster reader, "
    "a larger --buffer-pages, narrower filters or --quiet lose fewer)"
)


def advice(max_cpu: float | None = None, lifetime: bool = False) -> str:
    """Why events were lost and what loses fewer, for the options given: a --max-cpu cap
    (a share of one CPU) the user set sheds on purpose; --lifetime refuses --quiet, so
    it is not offered."""
    if max_cpu is not None:
        return (
            f"--max-cpu {max_cpu * 100:g} capped the reader, and the kernel shed what did not "
            "fit (per-state statistics stay exact; a higher --max-cpu or narrower filters "
            "lose fewer)"
        )
    if lifetime:
        return (
            "the output did not keep up (per-state statistics stay exact; a faster "
            "reader, a larger --buffer-pages or narrower filters lose fewer)"
        )
    return ADVICE


class LossSource(Protocol):
    def lost_so_far(self) -> int: ...

    def finish_accounting(self, summary: Summary) -> None: ...


class LossReport(Stage):
    """Reports lost events on stderr: live (throttled) and once at exit.

    It goes first among the stages: its on_finish completes the final summary's
    accounting (unread events, map evictions) before the outputs print it.
    """

    def __init__(
        self, source: LossSource, err: TextIO, unit: str = "events", why: str = ADVICE
    ) -> None:
        self.lost_so_far = source.lost_so_far
        # what the kernel sends: "events", or "connections" (--lifetime: one record each)
        self.unit = unit
        self.finish_accounting = source.finish_accounting
        self.err = err
        self.why = why
        self.reported = 0
        self.next_check_ns = 0

    def on_tick(self, now_ns: int) -> None:
        if now_ns < self.next_check_ns:
            return None
        self.next_check_ns = now_ns + REPORT_INTERVAL_NS
        lost = self.lost_so_far()
        if lost > self.reported:
            self.reported = lost
            self._say(f"{lost} {self.unit} lost so far: {self.why}")
        return None

    def on_finish(self, summary: Summary) -> None:
        self.finish_accounting(summary)
        if summary.lost_total:
            self._say(f"{summary.lost_total} {self.unit} lost in all: {self.why}")
        if summary.missed:
            closes = (
                f" ({summary.stale} of them a traced socket's close, found when a new "
                "socket reused its address)"
                if summary.stale
                else ""
            )
            self._say(
                f"up to {summary.missed} transitions were never seen{closes}: the kernel "
                "skips a tracepoint hit while a BPF program already runs on that CPU "
                "(bpftool prog show: recursion_misses)"
            )

    def _say(self, text: str) -> None:
        self.err.write(f"tcptrace: {text}\n")
        self.err.flush()
