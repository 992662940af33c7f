"""--interval: a compact per-state table every few seconds, like top for TCP states.

Numbers come from the kernel's exact statistics (a Summary read every interval),
so the table is right even when per-event output would lose events. Per state:
sockets that entered and left it during the interval, sockets in it now (of those
that entered it since start), and percentiles of the time spent in it by the
sockets that left during the interval.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from typing import Callable, TextIO

from tcptrace.kernel.events import C_SEEN
from tcptrace.kernel.stats import PERCENTILES, StateStats, Summary
from tcptrace.outputs.output import NS_PER_S, format_duration
from tcptrace.sockets.flows import lost_events, sockets_in_states, state_flows
from tcptrace.sockets.stuck import Oldest
from tcptrace.stages import Stage
from tcptrace.states import LIFECYCLE_ORDER, TcpState

# The current Summary of the kernel's statistics (loader.Probe.summary or a wrapper).
SummaryProvider = Callable[[], Summary]

# ANSI SGR codes; used only when colour is wanted (see want_color).
_RESET = "\x1b[0m"
_BOLD = "1"
_DIM = "2"
_REVERSE = "7"
_STATE_COLORS = {
    TcpState.LISTEN: "34",  # blue
    TcpState.SYN_SENT: "33",  # yellow: connection being set up
    TcpState.SYN_RECV: "33",
    TcpState.ESTABLISHED: "32",  # green
    TcpState.FIN_WAIT1: "35",  # magenta: being torn down
    TcpState.FIN_WAIT2: "35",
    TcpState.CLOSING: "35",
    TcpState.TIME_WAIT: "35",
    TcpState.CLOSE_WAIT: "31",  # red: the peer closed, this side has not yet
    TcpState.LAST_ACK: "35",
    TcpState.CLOSE: _DIM,
}
# Redraw in place on a terminal: cursor home, clear screen.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def want_color(
    stream: TextIO, no_color: bool = False, environ: Mapping[str, str] | None = None
) -> bool:
    """Colour only on a terminal, never in a pipe; --no-color and NO_COLOR turn it off.

    NO_COLOR follows no-color.org: set and not empty means no colour.
    """
    env = os.environ if environ is None else environ
    if no_color or env.get("NO_COLOR", ""):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def interval_stats(now: StateStats | None, before: StateStats | None) -> StateStats:
    """Durations of the sockets that left a state between two cumulative readings."""
    if now is None:
        return StateStats()
    if before is None:
        return now
    hist = [a - b for a, b in zip(now.hist, before.hist)]
    # the cumulative max still bounds the interval's values (percentile caps at it)
    return StateStats(
        count=now.count - before.count,
        total_ns=now.total_ns - before.total_ns,
        max_ns=now.max_ns,
        hist=hist,
        unknown=now.unknown - before.unknown,
    )


class LiveTable:
    """Renders one frame of the table from two cumulative summaries."""

    def __init__(self, color: bool = False, stuck: bool = False) -> None:
        self.color = color
        self.stuck = stuck  # a STUCK column: sockets past their --stuck threshold now

    def _paint(self, text: str, code: str | None) -> str:
        if not self.color or not code:
            return text
        return f"\x1b[{code}m{text}{_RESET}"

    def render(
        self,
        now: Summary,
        before: Summary,
        seconds: float,
        wall: float,
        oldest: Oldest | None = None,
        width: int | None = None,
    ) -> str:
        """One frame; width: the terminal's columns, which no line exceeds (columns
        dropped as top drops them, the rest cut), None in a pipe."""
        entered_now, left_now = state_flows(now)
        entered_before, left_before = state_flows(before)
        current = sockets_in_states(now)
        if oldest is not None:
            # the walk counted them at one instant: exact, where entries minus exits
            # read from maps that change while they are read run ahead at high rates
            current = {st: oldest.count.get(st, 0) for st in current}
        traced = now.counters[C_SEEN] - before.counters[C_SEEN]
        rate = traced / seconds if seconds > 0 else 0.0
        clock = time.strftime("%H:%M:%S", time.localtime(wall))
        # this interval, then totals since start
        title = (
            f"tcptrace {clock}  {traced} transitions in {seconds:.1f}s ({rate:,.0f}/s), "
            f"{lost_events(now) - lost_events(before)} lost  "
            f"total {now.counters[C_SEEN]}, {lost_events(now)} lost"
        )
        ages = oldest.ages if oldest is not None else {}
        columns = [("STATE", 12), ("ENTER", 9), ("LEAVE", 9), ("NOW", 9)]
        if oldest is not None:
            columns.append(("OLDEST", _OLDEST_WIDTH))
            if self.stuck:
                columns.append(("STUCK", 7))
        columns += [(f"p{p:g}", 9) for p in PERCENTILES]
        shown_columns = _fit(columns, width)
        header = "".join(_cell(name, w, name == "STATE") for name, w in shown_columns)
        lines = [self._paint(_cut(title, width), _BOLD), self._paint(_cut(header, width), _REVERSE)]
        shown = 0
        for state in LIFECYCLE_ORDER:
            s = int(state)
            entered = entered_now.get(s, 0) - entered_before.get(s, 0)
            left = left_now.get(s, 0) - left_before.get(s, 0)
            in_state = current.get(s)
            if not (entered_now.get(s) or left_now.get(s) or in_state or s in ages):
                continue  # never seen since start: keep the table compact
            shown += 1
            stats = interval_stats(now.states.get(s), before.states.get(s))
            cells = {
                "ENTER": str(entered),
                "LEAVE": str(left),
                "NOW": "-" if in_state is None else str(in_state),
            }
            if oldest is not None:
                cells["OLDEST"] = _age(ages.get(s))
                cells["STUCK"] = str(oldest.stuck.get(s, 0))
            for p in PERCENTILES:
                cells[f"p{p:g}"] = format_duration(stats.percentile(p)) if stats.count else "-"
            name_w = shown_columns[0][1]
            plain = f"{state.name:<{name_w}}" + "".join(
                _cell(cells[key], w) for key, w in shown_columns[1:]
            )
            plain = _cut(plain, width)
            name = self._paint(plain[:name_w], _STATE_COLORS.get(state))
            row = plain[name_w:]
            if self.color and not (entered or left):
                row = self._paint(row, _DIM)  # quiet states fade on a terminal
            lines.append(name + row)
        if not shown:
            lines.append("(no transitions yet)")
        return "\n".join(lines) + "\n"


# Dropped first when the terminal is narrow: the percentiles from the right, then
# STUCK, OLDEST, LEAVE and ENTER; STATE and NOW stay.
_DROP_ORDER = ("p99", "p90", "p50", "STUCK", "OLDEST", "LEAVE", "ENTER")


def _fit(columns: list[tuple[str, int]], width: int | None) -> list[tuple[str, int]]:
    """The columns that fit in width, in their order."""
    shown = list(columns)
    if width is None:
        return shown
    for key in _DROP_ORDER:
        if sum(w for _, w in shown) <= width:
            break
        shown = [c for c in shown if c[0] != key]
    return shown


def _cell(text: str, width: int, left: bool = False) -> str:
    return f"{text:<{width}}" if left else f"{text:>{width}}"


def _cut(text: str, width: int | None) -> str:
    """A line that never wraps: cut at the terminal's width."""
    return text if width is None or len(text) <= width else text[:width]


# ">=542.96ms": a lower bound takes two more characters than a duration
_OLDEST_WIDTH = 11


def _age(age: tuple[int, bool] | None) -> str:
    """An OLDEST cell: the age of the state's oldest socket ('>=' older than tracing)."""
    if age is None:
        return "-"
    ns, lower = age
    return (">=" if lower else "") + format_duration(ns)


class IntervalView(Stage):
    """--interval S: read the kernel's statistics every S seconds and print the table.

    On a terminal it redraws in place like top; in a pipe it appends one table per
    interval, separated by a blank line, with no escape sequences.
    """

    def __init__(
        self,
        out: TextIO,
        summaries: SummaryProvider,
        interval_s: float,
        color: bool = False,
        redraw: bool = False,
        oldest: Callable[[], Oldest] | None = None,
        stuck: bool = False,
    ) -> None:
        self.out = out
        self.summaries = summaries
        self.interval_ns = int(interval_s * NS_PER_S)
        # each state's oldest socket now (sockets/stuck.StuckWatch.oldest), if scanned
        self.oldest = oldest
        self.table = LiveTable(color, stuck=stuck)
        self.redraw = redraw
        self.previous = Summary()
        self.previous_ns = 0
        self.due_ns = 0
        self.frames = 0

    def on_start(self) -> None:
        # the kernel's maps start empty when the program loads: the first frame
        # counts from zero (a reading here would take in transitions since load)
        self.previous_ns = time.monotonic_ns()
        self.due_ns = self.previous_ns + self.interval_ns

    def on_tick(self, now_ns: int) -> None:
        if now_ns < self.due_ns:
            return
        self.frame(now_ns)
        # next frame on the grid from start, so frames do not drift with slow ticks
        while self.due_ns <= now_ns:
            self.due_ns += self.interval_ns

    def frame(self, now_ns: int) -> None:
        current = self.summaries()
        seconds = (now_ns - self.previous_ns) / NS_PER_S
        oldest = self.oldest() if self.oldest is not None else None
        # on a terminal, as wide as it is now (it may have been resized); a pipe has none
        width = shutil.get_terminal_size().columns if self.redraw else None
        text = self.table.render(current, self.previous, seconds, time.time(), oldest, width)
        if self.redraw:
            text = CLEAR_SCREEN + text
        elif self.frames:
            text = "\n" + text
        self.out.write(text)
        self.out.flush()
        self.frames += 1
        self.previous = current
        self.previous_ns = now_ns

    def on_finish(self, summary: Summary) -> None:
        # the exit summary follows (TextOutput); separate it from the last frame
        if self.frames:
            self.out.write("\n")
            self.out.flush()
