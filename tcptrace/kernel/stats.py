"""Per-state duration statistics: the histogram the kernel keeps, and its summary.

The kernel (bpf/tcptrace.bpf.c) counts every transition of a matching socket into
per-CPU maps, so these numbers are exact even when the perf buffer overflows.
`StateStats.add` builds the same histogram in Python from events, for tests and
for consumers without the kernel maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tcptrace.kernel.events import (
    C_DELETED,
    C_DROPPED,
    C_FAST,
    C_INSERTED,
    C_SHED,
    C_STALE,
    HIST_SLOTS,
    HIST_SUB_BITS,
    NCOUNTERS,
)
from tcptrace.states import NSTATES, is_birth

_SUB = 1 << HIST_SUB_BITS

PERCENTILES = (50.0, 90.0, 99.0)


def hist_slot(value: int) -> int:
    """Bucket of a duration in ns: log2 plus HIST_SUB_BITS of mantissa (as in the BPF code)."""
    if value < _SUB:
        return value
    msb = value.bit_length() - 1
    shift = msb - HIST_SUB_BITS
    return ((msb - HIST_SUB_BITS + 1) << HIST_SUB_BITS) + ((value >> shift) & (_SUB - 1))


def slot_lower(slot: int) -> int:
    """Smallest duration that falls in a bucket."""
    if slot < _SUB:
        return slot
    msb = (slot >> HIST_SUB_BITS) + HIST_SUB_BITS - 1
    return (_SUB + (slot & (_SUB - 1))) << (msb - HIST_SUB_BITS)


@dataclass
class StateStats:
    """Durations spent in one state by the sockets that left it."""

    count: int = 0
    total_ns: int = 0
    max_ns: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * HIST_SLOTS)
    # sockets that left the state after an unknown time (seen mid-life)
    unknown: int = 0

    def add(self, delta_ns: int) -> None:
        self.count += 1
        self.total_ns += delta_ns
        if delta_ns > self.max_ns:
            self.max_ns = delta_ns
        self.hist[hist_slot(delta_ns)] += 1

    def merge(self, other: StateStats) -> None:
        self.count += other.count
        self.total_ns += other.total_ns
        self.max_ns = max(self.max_ns, other.max_ns)
        self.unknown += other.unknown
        for i, n in enumerate(other.hist):
            if n:
                self.hist[i] += n

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0

    def percentile(self, pct: float) -> float:
        """Estimated duration at a percentile, interpolated inside its bucket (<= 12.5% off)."""
        if not self.count:
            return 0.0
        rank = pct / 100.0 * self.count
        seen = 0
        for slot, n in enumerate(self.hist):
            if not n:
                continue
            if seen + n >= rank:
                lo = slot_lower(slot)
                hi = slot_lower(slot + 1) if slot + 1 < HIST_SLOTS else lo
                frac = (rank - seen) / n
                return min(lo + (hi - lo) * frac, float(self.max_ns))
            seen += n
        return float(self.max_ns)


@dataclass
class Summary:
    """Everything the exit summary and the metrics report."""

    states: dict[int, StateStats] = field(default_factory=dict)
    transitions: dict[tuple[int, int], int] = field(default_factory=dict)
    counters: list[int] = field(default_factory=lambda: [0] * NCOUNTERS)
    # events the perf rings reported lost (PERF_RECORD_LOST; the same events the
    # program counts as dropped)
    lost: int = 0
    # one-line remarks the stages add (things not followed, limits reached)
    notes: list[str] = field(default_factory=list)
    # the numbers behind those remarks, by name, for machine-readable summaries
    # (time_wait_not_followed, time_wait_dropped_with_netns, still_in_time_wait)
    remarks: dict[str, int] = field(default_factory=dict)
    # events handed to the perf buffer but not read when the summary was taken
    unread: int = 0
    # entries in the kernel's per-socket map when the summary was taken
    sockets_tracked: int = 0
    # traced transitions held back at exit and never shown: FIN_WAIT2 -> CLOSE of
    # sockets still waiting in FIN_WAIT2 for their peer (tcptrace/sockets/timewait.py)
    held: int = 0
    # tracepoint hits the kernel skipped: a BPF program was already running on that CPU
    # (every TCP socket's, not only the filtered ones: an upper bound)
    missed: int = 0
    # --slower-than as given ("1s", "2s,SYN_SENT=100ms"); empty without it
    slower_than: str = ""

    def remark(self, name: str, count: int, note: str) -> None:
        """A remark of the summary: its line for people, its number for programs."""
        self.remarks[name] = self.remarks.get(name, 0) + count
        self.notes.append(note)

    def state(self, state: int) -> StateStats:
        stats = self.states.get(state)
        if stats is None:
            stats = self.states[state] = StateStats()
        return stats

    def record(self, oldstate: int, newstate: int, delta_ns: int, known: bool) -> None:
        """Account one transition (user-space path, mirrors the kernel's record_stats)."""
        key = (oldstate, newstate)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        if known:
            self.state(oldstate).add(delta_ns)
        elif not is_birth(oldstate, newstate):
            self.state(oldstate).unknown += 1

    @classmethod
    def from_maps(
        cls,
        hist: list[int],
        dsum: list[int],
        dmax: list[int],
        trans: list[int],
        counters: list[int],
    ) -> Summary:
        """Build from the kernel's maps, already summed over CPUs (max for dmax)."""
        summary = cls(counters=list(counters))
        for state in range(NSTATES):
            buckets = hist[state * HIST_SLOTS : (state + 1) * HIST_SLOTS]
            n = sum(buckets)
            if n:
                summary.states[state] = StateStats(
                    count=n, total_ns=dsum[state], max_ns=dmax[state], hist=list(buckets)
                )
        for index, n in enumerate(trans):
            if n:
                old, new = divmod(index, NSTATES)
                summary.transitions[(old, new)] = n
        # sockets that left a state after an unknown time: transitions minus timed ones
        left: dict[int, int] = {}
        for (old, new), n in summary.transitions.items():
            if not is_birth(old, new):
                left[old] = left.get(old, 0) + n
        for old, n in left.items():
            known = summary.states.get(old)
            timed = known.count if known else 0
            if n > timed:
                summary.state(old).unknown = n - timed
        return summary

    @property
    def lost_total(self) -> int:
        """Every event that passed the filters and was not delivered to the output.

        The kernel counts a failed perf submission (DROPPED) and perf reports the same
        loss again through its lost records, late: take the larger, never the sum.
        """
        dropped = max(self.counters[C_DROPPED], self.lost)
        return dropped + self.counters[C_SHED] + self.unread

    @property
    def faster(self) -> int:
        """Transitions the kernel did not submit: faster than --slower-than (not lost)."""
        return self.counters[C_FAST]

    @property
    def evicted(self) -> int:
        """Sockets the full LRU map dropped: what went in, minus what left by CLOSE, minus what is
        still there (a race between CPUs can make the raw difference slightly negative)."""
        inserted, deleted = self.counters[C_INSERTED], self.counters[C_DELETED]
        return max(0, inserted - deleted - self.sockets_tracked)

    @property
    def stale(self) -> int:
        """Traced sockets whose close the kernel skipped, found when a new socket
        reused the address (the new one started afresh): a part of `missed`."""
        return self.counters[C_STALE]

    @property
    def total_transitions(self) -> int:
        return sum(self.transitions.values())


def summary_to_json(summary: Summary) -> dict:
    """A Summary as a JSON object (a capture's END record): everything the exit summary
    prints, the histograms sparse ([slot, count] pairs)."""
    return {
        "states": {
            str(state): {
                "count": s.count,
                "total_ns": s.total_ns,
                "max_ns": s.max_ns,
                "unknown": s.unknown,
                "hist": [[i, n] for i, n in enumerate(s.hist) if n],
            }
            for state, s in summary.states.items()
        },
        "transitions": [[old, new, n] for (old, new), n in summary.transitions.items()],
        "counters": list(summary.counters),
        "lost": summary.lost,
        "notes": list(summary.notes),
        "remarks": dict(summary.remarks),
        "unread": summary.unread,
        "sockets_tracked": summary.sockets_tracked,
        "held": summary.held,
        "missed": summary.missed,
        "slower_than": summary.slower_than,
    }


def summary_from_json(obj: dict) -> Summary:
    """summary_to_json's inverse; ValueError (or KeyError, TypeError) on a malformed one."""
    summary = Summary()
    for state, s in obj["states"].items():
        stats = StateStats(
            count=int(s["count"]),
            total_ns=int(s["total_ns"]),
            max_ns=int(s["max_ns"]),
            unknown=int(s["unknown"]),
        )
        for slot, n in s["hist"]:
            stats.hist[int(slot)] = int(n)
        summary.states[int(state)] = stats
    for old, new, n in obj["transitions"]:
        summary.transitions[(int(old), int(new))] = int(n)
    counters = [int(n) for n in obj["counters"]]
    summary.counters = (counters + [0] * NCOUNTERS)[:NCOUNTERS]
    summary.lost = int(obj.get("lost", 0))
    summary.notes = [str(n) for n in obj.get("notes", [])]
    summary.remarks = {str(k): int(v) for k, v in obj.get("remarks", {}).items()}
    summary.unread = int(obj.get("unread", 0))
    summary.sockets_tracked = int(obj.get("sockets_tracked", 0))
    summary.held = int(obj.get("held", 0))
    summary.missed = int(obj.get("missed", 0))
    summary.slower_than = str(obj.get("slower_than", ""))
    return summary
