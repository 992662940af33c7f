"""Decoding the kernel's events: the Python mirror of bpf/tcptrace.h.

The C struct tcptrace_event is the one definition of the layout; EVENT_FIELDS
spells it out field by field in the same order and tests/kernel/test_layout.py checks
the two agree. Decoding is done in bulk with struct.iter_unpack, outside the
perf buffer callback, so the hot path is a memcpy per event.

With --lifetime the kernel sends one struct tcptrace_life per connection instead
(LIFE_FIELDS): its closing transition as an Event, then the connection's states and
its time in each (Life).
"""

from __future__ import annotations

import functools
import ipaddress
import operator
import socket
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

# (field name, C type, array length) in the order of struct tcptrace_event.
EVENT_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("ts_ns", "__u64", 1),
    ("delta_ns", "__u64", 1),
    ("skaddr", "__u64", 1),
    ("cgroup_id", "__u64", 1),
    ("pid", "__u32", 1),
    ("flags", "__u32", 1),
    ("netns", "__u32", 1),
    ("jiffies", "__u32", 1),
    ("saddr", "__u8", 16),
    ("daddr", "__u8", 16),
    ("sport", "__u16", 1),
    ("dport", "__u16", 1),
    ("family", "__u16", 1),
    ("oldstate", "__u8", 1),
    ("newstate", "__u8", 1),
    ("comm", "char", 16),
)

_STRUCT_CODES = {"__u64": "Q", "__u32": "I", "__u16": "H", "__u8": "B", "char": "s"}
_BYTES = frozenset({"__u8", "char"})


def _struct_format(fields: Iterable[tuple[str, str, int]]) -> str:
    parts = []
    for _name, ctype, length in fields:
        if ctype == "struct tcptrace_event":
            parts.append(_struct_format(EVENT_FIELDS)[1:])
            continue
        code = _STRUCT_CODES[ctype]
        if length > 1 and ctype in _BYTES:
            # byte arrays decode as bytes objects, not as many integers
            parts.append(f"{length}s")
        elif length > 1:
            parts.append(f"{length}{code}")
        else:
            parts.append(code)
    return "=" + "".join(parts)


EVENT_STRUCT = struct.Struct(_struct_format(EVENT_FIELDS))
EVENT_SIZE = EVENT_STRUCT.size

# States recorded per connection in a life record (TCPTRACE_LIFE_VISITS).
LIFE_VISITS = 8
# (field name, C type, array length) in the order of struct tcptrace_life.
LIFE_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("ev", "struct tcptrace_event", 1),
    ("birth_ns", "__u64", 1),
    ("visit_ns", "__u64", LIFE_VISITS),
    ("visit_state", "__u8", LIFE_VISITS),
    ("visits", "__u32", 1),
    ("reserved", "__u32", 1),
)
LIFE_STRUCT = struct.Struct(_struct_format(LIFE_FIELDS))
LIFE_SIZE = LIFE_STRUCT.size
# Where a life record's parts are in its unpacked tuple: the event's fields first.
_NEVENT = len(EVENT_FIELDS)
_BIRTH = _NEVENT
_TIMES = slice(_NEVENT + 1, _NEVENT + 1 + LIFE_VISITS)
_STATES = _NEVENT + 1 + LIFE_VISITS
_VISITS = _STATES + 1

# Constants shared with bpf/tcptrace.h (checked by tests/kernel/test_layout.py).
COMM_LEN = 16
F_DELTA_KNOWN = 0x1
F_OWNER_KNOWN = 0x2
F_NETNS_KNOWN = 0x4
# A stuck report from the map scan, not a transition (oldstate == newstate, delta_ns its age).
F_STUCK = 0x8
# At FIN_WAIT2/CLOSING -> CLOSE: the kernel looked whether a timewait socket took the
# socket's place; one did; its peer's FIN had come (so it is in TIME_WAIT).
F_TW_KNOWN = 0x10
F_TW = 0x20
F_TW_PEER_FIN = 0x40
# Not a transition: accept() gave the socket (skaddr) to pid/comm/cgroup_id, another
# process than its lines named before, or they named nobody; oldstate = newstate = 0
# (sockets/acceptors.py). With F_MOVED: they named another process (the listener is
# shared across processes).
F_ACCEPTED = 0x80
F_MOVED = 0x400
# Under owner filters: a shared listener's child whose listener's owner does not match,
# for its accept record to decide (not counted seen); on an accept record: the acceptor
# matches the owner filters (bpf/tcptrace.h).
F_UNDECIDED = 0x100
F_MATCHED = 0x200
# Flags only user space sets (bits 16-31, never used by the kernel; see tcptrace.h).
# delta_ns is a lower bound: the socket existed, in oldstate, when tracing started.
F_DELTA_LOWER = 0x10000
# The transition was found by polling sock_diag (timewait sockets), not traced:
# its time is known to the poll interval (see tcptrace/sockets/timewait.py).
F_POLLED = 0x20000
# A full socket's end (FIN_WAIT2/CLOSING -> CLOSE) whose timewait socket was not looked
# for (look-ups over their budget): it may have gone on to TIME_WAIT.
F_END_UNSURE = 0x40000
# The owner named is the listener's creator, one of several processes holding the
# listener, as no accept named the process that took the socket (sockets/acceptors.py).
F_OWNER_SHARED = 0x80000
C_SEEN = 0
C_SUBMITTED = 1
C_DROPPED = 2
C_SHED = 3
C_NO_START = 4
C_INSERTED = 5
C_DELETED = 6
C_STALE = 7
# Not submitted: faster than its state's --slower-than threshold (bpf/tcptrace.h).
C_FAST = 8
# Hits the tracepoint program missed (it was running, interrupted on its CPU) that the
# nested program handled instead (bpf/tcptrace.h).
C_RECOVERED = 9
# Records that are not transitions (accept records, undecided handshake lines) handed
# to the perf buffer; not in C_SEEN or C_SUBMITTED (bpf/tcptrace.h).
C_SIDE = 10
NCOUNTERS = 11
HIST_SUB_BITS = 3
HIST_SLOTS = 512

AF_INET = socket.AF_INET
AF_INET6 = socket.AF_INET6


class Event(NamedTuple):
    """One TCP state transition, as the kernel reported it."""

    ts_ns: int
    delta_ns: int
    skaddr: int
    cgroup_id: int
    pid: int
    flags: int
    netns: int
    jiffies: int  # with F_TW: jiffies (low 32 bits) as its timewait socket's timer was armed
    saddr: bytes
    daddr: bytes
    sport: int
    dport: int
    family: int
    oldstate: int
    newstate: int
    comm: bytes

    @property
    def delta_known(self) -> bool:
        return bool(self.flags & F_DELTA_KNOWN)

    @property
    def delta_lower(self) -> bool:
        return bool(self.flags & F_DELTA_LOWER)

    @property
    def owner_known(self) -> bool:
        return bool(self.flags & F_OWNER_KNOWN)

    @property
    def local_addr(self) -> str:
        return format_addr(self.family, self.saddr)

    @property
    def remote_addr(self) -> str:
        return format_addr(self.family, self.daddr)

    @property
    def command(self) -> str:
        return decode_comm(self.comm)


# Event from a tuple of its fields: Event._make without its Python-level frame
# (the decode loop makes one per transition).
make_event = functools.partial(tuple.__new__, Event)
# An Event's time (ts_ns leads it), as a C-level sort key.
event_time = operator.itemgetter(0)


class Life(NamedTuple):
    """A connection as the kernel summed it up (--lifetime), besides its closing Event."""

    event: Event  # the closing transition, as the kernel sent it
    birth_ns: int  # when it began; 0: seen mid-life, the first visit is untimed
    states: bytes  # the states it visited, in order (at most LIFE_VISITS)
    times: tuple[int, ...]  # its time in each, ns (0 for an untimed first visit)
    visits: int  # states visited: over LIFE_VISITS, the last recorded one sums the rest

    @property
    def born(self) -> bool:
        return bool(self.birth_ns)

    def visited(self) -> list[tuple[int, int | None]]:
        """(state, ns) in visit order; ns None when untimed (seen mid-life in it)."""
        n = min(self.visits, LIFE_VISITS)
        out: list[tuple[int, int | None]] = list(zip(self.states[:n], self.times[:n]))
        if out and not self.birth_ns:
            out[0] = (out[0][0], None)
        return out


def decode(raw: bytes) -> Event:
    """Decode one raw perf sample (which the kernel pads past EVENT_SIZE)."""
    return make_event(EVENT_STRUCT.unpack_from(raw))


# Life from a tuple of its fields, without Life.__new__'s Python-level frame (one a record).
_make_life = functools.partial(tuple.__new__, Life)


def life_of(fields: tuple) -> Life:
    """A life record from its unpacked LIFE_STRUCT fields."""
    return _make_life(
        (make_event(fields[:_NEVENT]), fields[_BIRTH], fields[_STATES], fields[_TIMES],
         fields[_VISITS])
    )  # fmt: skip


def decode_life(raw: bytes) -> Life:
    """Decode one raw life record (--lifetime)."""
    return life_of(LIFE_STRUCT.unpack_from(raw))


def decode_many(raws: Iterable[bytes]) -> Iterator[Event]:
    """Decode a batch of raw samples."""
    unpack = EVENT_STRUCT.unpack_from
    for raw in raws:
        yield make_event(unpack(raw))


@functools.lru_cache(maxsize=65536)
def format_addr(family: int, raw: bytes) -> str:
    """Address as text; IPv4-mapped IPv6 (::ffff:a.b.c.d) shows as IPv4, like ss."""
    if family == AF_INET:
        return socket.inet_ntop(AF_INET, raw[:4])
    addr = ipaddress.IPv6Address(raw[:16])
    mapped = addr.ipv4_mapped
    return str(mapped) if mapped is not None else str(addr)


def raw_address(family: int, text: str) -> bytes:
    """format_addr's inverse: an address as the kernel's 16 bytes (IPv4 in the first
    4; an IPv4 address of an AF_INET6 socket as IPv4-mapped IPv6)."""
    if family == AF_INET6 and ":" not in text:
        return socket.inet_pton(AF_INET6, f"::ffff:{text}")
    return socket.inet_pton(family, text).ljust(16, b"\0")


@functools.lru_cache(maxsize=4096)
def decode_comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
