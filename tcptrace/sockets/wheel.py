"""When the kernel's timer wheel fires a timewait socket's timer.

TIME_WAIT lasts TCP_TIMEWAIT_LEN (60 s) by its timer, but the timer wheel
(kernel/time/timer.c, Linux 4.8 on) files a timer that far ahead in a level whose
buckets are 8^level jiffies wide and runs it at its bucket's end: past the 60 s by
up to 512 jiffies at HZ=250 (2 s; seen here: 60.06 s to 61.96 s). Where the bucket
ends depends on the jiffies when the timer was armed, which the BPF program sends
with each socket that entered TIME_WAIT (events.Event.jiffies).

Jiffies follow CLOCK_MONOTONIC (tick_do_update_jiffies64: one jiffy per tick of
monotonic time), so the (time, jiffies) pairs of events tell HZ and where each
jiffy begins, closer with each pair; then any expiry time maps to its bucket's end.
"""

from __future__ import annotations

import re
from pathlib import Path

NS_PER_S = 1_000_000_000
# CONFIG_HZ choices (kernel/Kconfig.hz)
KNOWN_HZ = (100, 250, 300, 1000)
# Pairs this far apart tell HZ: ±1 jiffy in 0.05 s is under 10% at 250.
MIN_SPAN_NS = 200_000_000
# The wheel (LVL_CLK_SHIFT, LVL_BITS): each level's buckets 8 times wider, 64 of them
LVL_CLK_SHIFT = 3
LVL_SIZE = 64
JIFFIES_WRAP = 1 << 32  # the events carry the low 32 bits
# "now at N nsecs" (CLOCK_MONOTONIC) then, microseconds later, "jiffies: J" (root only)
TIMER_LIST = Path("/proc/timer_list")


def sample_jiffies(path: Path = TIMER_LIST) -> tuple[int, int] | None:
    """A (monotonic ns, jiffies) pair from the kernel's timer list, or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    now = re.search(r"^now at (\d+) nsecs", text, re.MULTILINE)
    jiffies = re.search(r"^jiffies: (\d+)", text, re.MULTILINE)
    if now is None or jiffies is None:
        return None
    return int(now.group(1)), int(jiffies.group(1)) % JIFFIES_WRAP


def level_grain(delta_jiffies: int) -> int:
    """The width in jiffies of the buckets of the level a timer that far ahead is
    filed in (calc_wheel_index: level n from LVL_START(n) = 63 << 3(n - 1) jiffies)."""
    level = 0
    while delta_jiffies >= (LVL_SIZE - 1) << (level * LVL_CLK_SHIFT):
        level += 1
    return 1 << (level * LVL_CLK_SHIFT)


class TimerWheel:
    """Learns HZ and the jiffies' phase from (monotonic ns, jiffies) pairs."""

    def __init__(self) -> None:
        self.first: tuple[int, int] | None = None
        self.hz: int | None = None
        # when jiffy 0 of the 32-bit count began, as bounds (ns): each pair narrows them
        self._lo: float | None = None
        self._hi: float | None = None
        self._base: tuple[int, int] | None = None  # (ns, jiffies) the bounds refer to

    def note(self, ts_ns: int, jiffies: int) -> None:
        if self.first is None:
            self.first = (ts_ns, jiffies)
            return
        if self.hz is None:
            t0, j0 = self.first
            span = ts_ns - t0
            if span < MIN_SPAN_NS:
                return
            rate = ((jiffies - j0) % JIFFIES_WRAP) * NS_PER_S / span
            hz = min(KNOWN_HZ, key=lambda h: abs(h - rate))
            if abs(hz - rate) > 0.1 * hz:
                return
            self.hz = hz
            self._base = self.first
            self._narrow(*self.first)
        self._narrow(ts_ns, jiffies)

    def _narrow(self, ts_ns: int, jiffies: int) -> None:
        """jiffies = floor((t - start) / tick): this jiffy began at most t, and ended after t."""
        assert self._base is not None and self.hz is not None
        tick = NS_PER_S / self.hz
        _bt, bj = self._base
        # the base's jiffy began in [t - (k + 1) * tick, t - k * tick], k jiffies later
        k = (jiffies - bj) % JIFFIES_WRAP
        lo, hi = ts_ns - (k + 1) * tick, ts_ns - k * tick
        self._lo = lo if self._lo is None else max(self._lo, lo)
        self._hi = hi if self._hi is None else min(self._hi, hi)
        if self._lo > self._hi:  # a pair out of line (clock steps): start again from it
            self._base, self._lo, self._hi = (ts_ns, jiffies), ts_ns - tick, float(ts_ns)

    def tick_ns(self) -> int:
        """One jiffy: the resolution of a timer's expiry (the coarsest HZ until known)."""
        return NS_PER_S // (self.hz or min(KNOWN_HZ))

    def fires_ns(self, armed_ns: int, expires_ns: int) -> int | None:
        """When a timer armed at armed_ns to expire at expires_ns runs (None: not known
        yet). Exact to the phase bounds, within a jiffy."""
        if self.hz is None or self._base is None or self._lo is None or self._hi is None:
            return None
        tick = NS_PER_S / self.hz
        start = (self._lo + self._hi) / 2  # when the base's jiffy began
        _bt, bj = self._base

        def jiffy_at(t: int) -> int:
            return bj + int((t - start) // tick)

        armed, expires = jiffy_at(armed_ns), jiffy_at(expires_ns)
        # calc_index: rounded up to the level's grain, never early
        grain = level_grain(expires - armed)
        bucket = (expires // grain + 1) * grain
        return int(start + (bucket - bj) * tick)
