"""One walk of the per-socket map, and the same walk done in user space.

The program's BPF iterator (bpf/tcptrace.bpf.c, BPF_ITER) walks the map in the
kernel. Some kernels, or their security policy, refuse iterator programs (seen: a
host that answers EPERM to every BPF_PROG_TYPE_TRACING load). Then the loader
reads the map in batches and UserScan walks it here, with the iterator's rules,
so --stuck, OLDEST and the gauges work the same; a walk of 65,536 entries costs
~2x the kernel's (BENCHMARKS.md).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

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

    def scan(self, entries: Iterable[tuple[int, bytes]], now_ns: int, list_all: int) -> ScanResult:
        oldest: dict[int, int] = {}
        count: dict[int, int] = {}
        stuck: dict[int, int] = {}
        records: list[Event] = []
        reported: dict[int, int] = {}
        unpack = SK_INFO.unpack_from
        for sk, raw in entries:
            (entered, cgroup_id, pid, flags, comm, st, netns, _mark, saddr, daddr, sport, dport,
             family, _reserved) = unpack(raw)  # fmt: skip
            if st >= NSTATES or entered > now_ns:
                continue  # unknown, or it moved after the scan began: young
            count[st] = count.get(st, 0) + 1
            if entered < oldest.get(st, now_ns + 1):
                oldest[st] = entered
            if list_all != SCAN_EVERY:
                limit = self.stuck_ns.get(st)
                if not limit or now_ns - entered < limit:
                    continue
                stuck[st] = stuck.get(st, 0) + 1
                # a socket moved on since has another entry time: its mark lapses
                seen_at = self.reported.get(sk)
                reported[sk] = entered
                if list_all != SCAN_STUCK and seen_at == entered:
                    continue
            ev_flags = F_STUCK | F_DELTA_KNOWN | (flags & F_OWNER_KNOWN)
            if netns:
                ev_flags |= F_NETNS_KNOWN
            records.append(
                make_event(
                    (
                        now_ns,
                        now_ns - entered,
                        sk,
                        cgroup_id,
                        pid,
                        ev_flags,
                        netns,
                        0,
                        saddr,
                        daddr,
                        sport,
                        dport,
                        family,
                        st,
                        st,
                        comm,
                    )
                )
            )
        if list_all != SCAN_EVERY:
            self.reported = reported
        return ScanResult(now_ns, oldest, count, stuck, records)
