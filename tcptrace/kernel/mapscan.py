"""One walk of the per-socket map, and the same walk done in user space.

The program's BPF iterator (bpf/tcptrace.bpf.c, BPF_ITER) walks the map in the
kernel. Some kernels, or their security policy, refuse iterator programs (seen: a
host that answers EPERM to every BPF_PROG_TYPE_TRACING load). Then the loader
reads the map in batches and UserScan walks it here, with the iterator's rules,
so --stuck, OLDEST and the gauges work the same; a walk of 65,536 entries costs
about what the batch read's system call does, 20 ms (BENCHMARKS.md).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import compress

from tcptrace.kernel.events import (
    F_DELTA_KNOWN,
    F_NETNS_KNOWN,
    F_OWNER_KNOWN,
    F_STUCK,
    Event,
    make_event,
)
from tcptrace.states import NSTATES

# What a scan writes (the program's SCAN_*): the sockets that crossed their threshold
# since the last scan; every socket past its threshold (the list at exit); every socket.
SCAN_NEW = 0
SCAN_STUCK = 1
SCAN_EVERY = 2

# struct sk_info of bpf/tcptrace.bpf.c compiled with KEEP_ENDS, up to its ends: ts,
# cgroup_id, pid, flags, comm, state, netns, reported, then struct sk_ends (saddr,
# daddr, sport, dport, family, reserved). The loader checks it against bcc's layout.
_SK_INFO = (("ts", "Q"), ("cgroup_id", "Q"), ("pid", "I"), ("flags", "I"), ("comm", "16s"),
            ("state", "I"), ("netns", "I"), ("reported", "Q"), ("ends", "16s16sHHHH"))  # fmt: skip
SK_INFO = struct.Struct("=" + "".join(code for _name, code in _SK_INFO))
# where each field is: the loader compares them with bcc's layout of the map's values
SK_INFO_OFFSETS = {
    name: struct.calcsize("=" + "".join(code for _n, code in _SK_INFO[:i]))
    for i, (name, _code) in enumerate(_SK_INFO)
}
_STATE_AT = SK_INFO_OFFSETS["state"]
SK_INFO_TS_STATE = struct.Struct(f"=Q{_STATE_AT - 8}xI")  # an sk_info's ts and state
# struct sk_age (SCAN_AGES): a socket's entry time and state alone, in a map of their
# own that the kernel keeps where it refuses the iterator: a batch read of 65,536
# takes half the time of the sk_info map's (BENCHMARKS.md). Checked like sk_info.
_AGE = (("ts", "Q"), ("state", "I"), ("reserved", "I"))
AGE = struct.Struct("=" + "".join(code for _name, code in _AGE))
AGE_OFFSETS = {
    name: struct.calcsize("=" + "".join(code for _n, code in _AGE[:i]))
    for i, (name, _code) in enumerate(_AGE)
}


# a walk's findings: the entries to report (indexes into the batch), and per state the
# oldest entry time, the sockets in it and those past their threshold
_Walk = tuple[list[int], dict[int, int], dict[int, int], dict[int, int]]


@dataclass
class ScanResult:
    """One walk of the per-socket map (Probe.scan)."""

    now_ns: int  # CLOCK_MONOTONIC when it began: ages are measured to it
    oldest: dict[int, int]  # state -> entry time of its oldest socket
    count: dict[int, int]  # state -> sockets in it
    stuck: dict[int, int]  # state -> sockets past its --stuck threshold
    records: list[Event]  # stuck reports (F_STUCK events)

    def oldest_age_ns(self, state: int) -> int | None:
        entered = self.oldest.get(state)
        return None if entered is None else max(0, self.now_ns - entered)


class UserScan:
    """The iterator's walk over (socket address, sk_info bytes) entries. The iterator
    marks a reported socket in its map entry; this keeps the marks itself."""

    def __init__(self, stuck_ns: dict[int, int]) -> None:
        self.stuck_ns = stuck_ns
        # socket -> the entry time it was reported stuck at (one report per stay)
        self.reported: dict[int, int] = {}

    def scan_values(
        self, addresses: Sequence[int], raw: bytes, value_size: int, now_ns: int, list_all: int
    ) -> ScanResult:
        """The walk over the map as one batch read gives it: the sockets' addresses, and
        their sk_info values end to end, value_size bytes each."""
        walk = self._walk(addresses, raw, value_size, _STATE_AT, now_ns, list_all)
        records = [_report(addresses[i], raw, i * value_size, now_ns) for i in walk[0]]
        return ScanResult(now_ns, *walk[1:], records)

    def scan_ages(
        self,
        addresses: Sequence[int],
        ages: bytes,
        now_ns: int,
        list_all: int,
        details: Callable[[int], bytes | None],
    ) -> ScanResult:
        """The same walk over the ages map (struct sk_age values end to end): a reported
        socket's sk_info is asked of details(socket), None if it went since."""
        walk = self._walk(addresses, ages, AGE.size, AGE_OFFSETS["state"], now_ns, list_all)
        records = []
        for i in walk[0]:
            info = details(addresses[i])
            if info is not None:
                records.append(_report(addresses[i], info, 0, now_ns))
        return ScanResult(now_ns, *walk[1:], records)

    def _walk(
        self,
        addresses: Sequence[int],
        raw: bytes,
        value_size: int,
        state_at: int,
        now_ns: int,
        list_all: int,
    ) -> _Walk:
        """The entries' times (a u64 at the value's start) and states (a u32 at state_at)
        are taken out of the batch whole and counted in C (bytes.count, min over
        compress): Python visits only the entries it reports (65,536 entries: 44 ms
        when each was decoded in Python, 7 ms when only time and state were, 3 ms so)."""
        columns = _columns(raw, value_size, state_at)
        if columns is None or (columns[0] and max(columns[0]) > now_ns):
            # an odd layout, or a socket that moved after the scan began (the loader
            # takes now_ns after its read, so only a caller's older clock finds one)
            return self._visit_each(addresses, raw, value_size, state_at, now_ns, list_all)
        return self._count_in_c(addresses, *columns, now_ns, list_all)

    def _count_in_c(
        self,
        addresses: Sequence[int],
        times: list[int],
        states: bytes,
        now_ns: int,
        list_all: int,
    ) -> _Walk:
        """Per state, its sockets picked out of the columns by C loops: the entries to
        report, and per state the oldest entry time, the count and the stuck count."""
        oldest: dict[int, int] = {}
        count: dict[int, int] = {}
        stuck: dict[int, int] = {}
        picked: list[int] = []
        reported: dict[int, int] = {}
        known = self.reported
        everything = len(states)
        for st in range(NSTATES):
            n = states.count(st)
            if not n:
                continue
            count[st] = n
            mine = states.translate(_ONE_STATE[st])  # 1 where the entry is in st
            oldest[st] = min(times) if n == everything else min(compress(times, mine))
            if list_all == SCAN_EVERY:
                continue
            limit = self.stuck_ns.get(st, 0)
            if not limit or now_ns - oldest[st] < limit:
                continue
            for i in compress(range(everything), mine):
                entered = times[i]
                if now_ns - entered < limit:
                    continue
                stuck[st] = stuck.get(st, 0) + 1
                # a socket moved on since has another entry time: its mark lapses
                sk = addresses[i]
                reported[sk] = entered
                if list_all != SCAN_STUCK and known.get(sk) == entered:
                    continue
                picked.append(i)
        if list_all == SCAN_EVERY:
            picked = list(compress(range(everything), states.translate(_KNOWN_STATE)))
        else:
            picked.sort()  # map order, as the iterator reports
            self.reported = reported
        return picked, oldest, count, stuck

    def _visit_each(
        self,
        addresses: Sequence[int],
        raw: bytes,
        value_size: int,
        state_at: int,
        now_ns: int,
        list_all: int,
    ) -> _Walk:
        """The same walk, one entry at a time in Python: for what the C path leaves."""
        head = struct.Struct(f"=Q{state_at - 8}xI{value_size - state_at - 4}x")
        count = [0] * NSTATES
        oldest = [now_ns + 1] * NSTATES
        stuck = [0] * NSTATES
        limits = [self.stuck_ns.get(st, 0) for st in range(NSTATES)]
        every = list_all == SCAN_EVERY
        picked: list[int] = []
        reported: dict[int, int] = {}
        known = self.reported
        for i, (entered, st) in enumerate(head.iter_unpack(raw)):
            if st >= NSTATES or entered > now_ns:
                continue  # unknown, or it moved after the scan began: young
            count[st] += 1
            if entered < oldest[st]:
                oldest[st] = entered
            if every:
                picked.append(i)
                continue
            limit = limits[st]
            if not limit or now_ns - entered < limit:
                continue
            stuck[st] += 1
            # a socket moved on since has another entry time: its mark lapses
            sk = addresses[i]
            reported[sk] = entered
            if list_all != SCAN_STUCK and known.get(sk) == entered:
                continue
            picked.append(i)
        if not every:
            self.reported = reported
        return (
            picked,
            {st: t for st, t in enumerate(oldest) if count[st]},
            {st: n for st, n in enumerate(count) if n},
            {st: n for st, n in enumerate(stuck) if n},
        )


# translate() tables: an entry's state byte to 1 where it is the one state, or any
# known state, else 0 (compress() then keeps those entries)
_ONE_STATE = [bytes(int(b == st) for b in range(256)) for st in range(NSTATES)]
_KNOWN_STATE = bytes(int(b < NSTATES) for b in range(256))


def _columns(raw: bytes, value_size: int, state_at: int) -> tuple[list[int], bytes] | None:
    """Every entry's entry time (u64) and state (one byte) out of a batch of values, by
    strided views: no Python per entry. None when the layout does not allow it (a
    value size that is no multiple of 8, a state above 255)."""
    if value_size % 8 or state_at % 4 or len(raw) % value_size:
        return None
    words = memoryview(raw).cast("Q")
    times = words[:: value_size // 8].tolist()
    try:
        states = bytes(memoryview(raw).cast("I")[state_at // 4 :: value_size // 4].tolist())
    except ValueError:
        return None
    return times, states


def _report(sk: int, raw: bytes, at: int, now_ns: int) -> Event:
    """The stuck report (F_STUCK event) of the socket whose sk_info is at raw[at:]."""
    (entered, cgroup_id, pid, flags, comm, st, netns, _mark, saddr, daddr, sport, dport,
     family, _reserved) = SK_INFO.unpack_from(raw, at)  # fmt: skip
    ev_flags = F_STUCK | F_DELTA_KNOWN | (flags & F_OWNER_KNOWN)
    if netns:
        ev_flags |= F_NETNS_KNOWN
    return make_event(
        (now_ns, now_ns - entered, sk, cgroup_id, pid, ev_flags, netns, 0, saddr, daddr,
         sport, dport, family, st, st, comm)
    )  # fmt: skip
