"""Decoding the kernel's events: the Python mirror of bpf/tcptrace.h.

The C struct tcptrace_event is the one definition of the layout; EVENT_FIELDS
spells it out field by field in the same order and tests/kernel/test_layout.py checks
the two agree. Decoding is done in bulk with struct.iter_unpack, outside the
perf buffer callback, so the hot path is a memcpy per event.
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
    ("reserved", "__u32", 1),
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


def _struct_format(fields: Iterable[tuple[str, str, int]]) -> str:
    parts = []
    for _name, ctype, length in fields:
        code = _STRUCT_CODES[ctype]
        if length > 1:
            # byte arrays decode as bytes objects, not as many integers
            parts.append(f"{length}s")
        else:
            parts.append(code)
    return "=" + "".join(parts)


EVENT_STRUCT = struct.Struct(_struct_format(EVENT_FIELDS))
EVENT_SIZE = EVENT_STRUCT.size

# Constants shared with bpf/tcptrace.h (checked by tests/kernel/test_layout.py).
COMM_LEN = 16
F_DELTA_KNOWN = 0x1
F_OWNER_KNOWN = 0x2
F_NETNS_KNOWN = 0x4
# A stuck report from the map scan, not a transition (oldstate == newstate, delta_ns its age).
F_STUCK = 0x8
# Flags only user space sets (bits 16-31, never used by the kernel; see tcptrace.h).
# delta_ns is a lower bound: the socket existed, in oldstate, when tracing started.
F_DELTA_LOWER = 0x10000
# The transition was found by polling sock_diag (timewait sockets), not traced:
# its time is known to the poll interval (see tcptrace/sockets/timewait.py).
F_POLLED = 0x20000
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
NCOUNTERS = 9
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
    reserved: int
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


def decode(raw: bytes) -> Event:
    """Decode one raw perf sample (which the kernel pads past EVENT_SIZE)."""
    return make_event(EVENT_STRUCT.unpack_from(raw))


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


@functools.lru_cache(maxsize=4096)
def decode_comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
