"""The kernel's socket table, read with sock_diag (NETLINK_SOCK_DIAG) through pyroute2.

The only module that talks sock_diag. It answers "which TCP sockets exist right
now" as plain Python values (each answered row becomes a `SockEntry`), with the
filtering done in the kernel: the request carries a state bitmask and an
inet_diag bytecode program for the ports, so only matching sockets cross to
user space. Used for the start-up snapshot, owner look-ups (the socket inode,
as `ss -p`) and following timewait sockets, which the tracepoint cannot see.

A netlink socket answers for the network namespace it was made in: `SocketTables`
keeps one per namespace, made inside it (pyroute2's setns on this thread, then
back), and lets one go when its namespace has gone (holding it would keep a
deleted namespace alive).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from tcptrace.compat import slotted
from tcptrace.errors import TcptraceError
from tcptrace.filters import Filters
from tcptrace.sockets.namespaces import NetnsIndex, own_netns
from tcptrace.states import TcpState

# inet_diag bytecode operations (include/uapi/linux/inet_diag.h).
BC_JMP = 1
BC_S_GE = 2
BC_S_LE = 3
BC_D_GE = 4
BC_D_LE = 5
# One operation: code (u8), yes (u8), no (u16): where to go on a match or a miss,
# in bytes from this operation. Port comparisons take a second slot holding the port.
_OP = struct.Struct("=BBH")
OP_SIZE = _OP.size
_PORT_OP_SIZE = 2 * OP_SIZE
# The kernel accepts a socket when the program ends exactly at its length and
# rejects it when a jump lands OP_SIZE past the end.
INET_DIAG_REQ_BYTECODE = 1
# Largest bytecode we build: jump offsets are u16, and the attribute length too.
MAX_BYTECODE = 60000

# The namespace's cap on timewait sockets: at 0 a closing socket never gets one.
MAX_TW_BUCKETS = "/proc/sys/net/ipv4/tcp_max_tw_buckets"
# How long a read of that cap is trusted (sysctl -w may change it at any time).
MAX_TW_REREAD_S = 1.0

# idiag_timer value of a timewait socket (net/ipv4/inet_diag.c, inet_twsk_diag_fill).
TIMER_TIMEWAIT = 3

ALL_STATES = frozenset(s for s in TcpState if s is not TcpState.NEW_SYN_RECV)
LISTEN_STATES = frozenset({TcpState.LISTEN})
# What a timewait minisock can show: TIME_WAIT, or FIN_WAIT2 for an orphan
# whose peer has not closed yet (tw_substate).
TIMEWAIT_STATES = frozenset({TcpState.TIME_WAIT, TcpState.FIN_WAIT2})

LOCAL = "local"
REMOTE = "remote"


@slotted
@dataclass(frozen=True)
class SockEntry:
    """One row of the kernel's TCP socket table."""

    family: int
    state: int
    local_addr: str  # IPv4-mapped IPv6 shown as IPv4, as in the event stream
    local_port: int
    remote_addr: str
    remote_port: int
    inode: int  # 0 for timewait sockets and sockets not yet accepted
    uid: int
    cookie: int
    timer: int  # idiag_timer: 0 none, 1 retransmit, 2 keepalive, 3 timewait, 4 probe
    expires_ms: int  # time left on that timer

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.local_addr, self.local_port, self.remote_addr, self.remote_port)

    @property
    def timewait(self) -> bool:
        """A timewait minisock (TIME_WAIT, or an orphan's FIN_WAIT2 kept as one)."""
        return self.timer == TIMER_TIMEWAIT


# The fixed part of an answer: struct nlmsghdr then struct inet_diag_msg
# (include/uapi/linux/inet_diag.h). Ports travel big-endian; the cookie is two
# host-order u32, read as one u64 as pyroute2 does.
NLMSG_HEADER = struct.Struct("=IHHII")
INET_DIAG_MSG = struct.Struct("=BBBBHH16s16sIQIIIII")
_DIAG_ANSWER_MIN = NLMSG_HEADER.size + INET_DIAG_MSG.size


@functools.lru_cache(maxsize=4096)
def _addr_text(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return canonical_addr(socket.inet_ntop(socket.AF_INET6, raw))


def decode_answer(data: bytes, offset: int) -> SockEntry:
    """One inet_diag_msg from the netlink message at `offset`, with struct: pyroute2's
    generic decoder costs ~30 µs a row, which bounds how many sockets tcptrace can
    follow within its look-up budget; this costs ~1.5 µs."""
    fields = INET_DIAG_MSG.unpack_from(data, offset + NLMSG_HEADER.size)
    family, state, timer, _, sport, dport, src, dst, _, cookie, expires, _, _, uid, inode = fields
    return SockEntry(
        family=family,
        state=state,
        local_addr=_addr_text(family, src),
        local_port=socket.ntohs(sport),
        remote_addr=_addr_text(family, dst),
        remote_port=socket.ntohs(dport),
        inode=inode,
        uid=uid,
        cookie=cookie,
        timer=timer,
        expires_ms=expires,
    )


def canonical_addr(text: str) -> str:
    """IPv4-mapped IPv6 as IPv4 (as events.format_addr and ss show it)."""
    if ":" not in text:
        return text
    mapped = ipaddress.IPv6Address(text).ipv4_mapped
    return str(mapped) if mapped is not None else text


# ---------------------------------------------------------------- bytecode


PortRange = tuple[int, int]


def port_ranges(ports: Iterable[int]) -> list[PortRange]:
    """Collapse a set of ports into sorted inclusive ranges."""
    ranges: list[PortRange] = []
    for port in sorted(set(ports)):
        if ranges and port == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], port)
        else:
            ranges.append((port, port))
    return ranges


def _clause(alternatives: Sequence[tuple[str, PortRange]], rejects_at: int) -> bytearray:
    """Code for "any of these (side, range) tests", falling through on a match.

    Laid out as ss does it: a failed test jumps to the next alternative, a
    passed alternative ends with a JMP over the rest of the clause, so every
    jump target lies on the chain of `yes` steps the kernel's checker walks.
    `rejects_at` is how far past this clause's end a total miss must jump.
    """
    sizes = [
        2 * _PORT_OP_SIZE + (OP_SIZE if i < len(alternatives) - 1 else 0)
        for i in range(len(alternatives))
    ]
    total = sum(sizes)
    code = bytearray()
    for i, (side, (lo, hi)) in enumerate(alternatives):
        start = len(code)
        next_alt = start + sizes[i]
        last = i == len(alternatives) - 1
        ge, le = (BC_S_GE, BC_S_LE) if side == LOCAL else (BC_D_GE, BC_D_LE)
        for j, (op, port) in enumerate(((ge, lo), (le, hi))):
            here = start + j * _PORT_OP_SIZE
            miss = (total + rejects_at if last else next_alt) - here
            code += _OP.pack(op, _PORT_OP_SIZE, miss) + _OP.pack(0, 0, port)
        if not last:
            here = len(code)
            # JMP never "matches": its `no` skips the other alternatives
            code += _OP.pack(BC_JMP, OP_SIZE, total - here)
    return code


def port_bytecode(clauses: Sequence[Sequence[tuple[str, PortRange]]]) -> bytes:
    """An inet_diag program accepting sockets for which every clause has a match."""
    sized = [bytes(_clause(c, 0)) for c in clauses if c]
    total = sum(len(c) for c in sized)
    code = bytearray()
    for clause in clauses:
        if not clause:
            continue
        rest = total - len(code) - len(_clause(clause, 0))
        # a miss jumps OP_SIZE past the end of the whole program
        code += _clause(clause, rest + OP_SIZE)
    if len(code) > MAX_BYTECODE:
        raise ValueError("port filter too large for an inet_diag request")
    return bytes(code)


def filter_clauses(filters: Filters) -> list[list[tuple[str, PortRange]]]:
    """The kernel's port filter (bpf/tcptrace.bpf.c port_match) as bytecode clauses."""
    clauses = []
    if filters.ports:
        ranges = port_ranges(filters.ports)
        clauses.append([(LOCAL, r) for r in ranges] + [(REMOTE, r) for r in ranges])
    if filters.local_ports:
        clauses.append([(LOCAL, r) for r in port_ranges(filters.local_ports)])
    if filters.remote_ports:
        clauses.append([(REMOTE, r) for r in port_ranges(filters.remote_ports)])
    return clauses


def state_bits(states: Iterable[int]) -> int:
    bits = 0
    for state in states:
        bits |= 1 << int(state)
    return bits


# ---------------------------------------------------------------- requests


# inet_diag_sockid.idiag_cookie that asks for no particular socket (INET_DIAG_NOCOOKIE)
INET_DIAG_NOCOOKIE = (1 << 64) - 1


def _request_address(family: int, text: str) -> tuple[int, ...]:
    """An address as inet_diag_req_v2 carries it (four big-endian words); an IPv4
    address of an AF_INET6 socket as IPv4-mapped IPv6, as the kernel looks it up."""
    if family == socket.AF_INET6:
        raw = socket.inet_pton(socket.AF_INET6, f"::ffff:{text}" if ":" not in text else text)
    else:
        raw = socket.inet_pton(socket.AF_INET, text).ljust(16, b"\0")
    return struct.unpack(">4I", raw)


def _families(filters: Filters) -> tuple[int, ...]:
    return (filters.family,) if filters.family else (socket.AF_INET, socket.AF_INET6)


class SocketTable:
    """An open sock_diag socket: dump the TCP table, filtered in the kernel.

    pyroute2's asynchronous socket on an event loop of our own: its synchronous
    DiagSocket turns the loop once per answered socket, which cost more than the
    decoding itself (13 µs a row, against 5 µs here).
    """

    def __init__(self, netns_path: str | None = None) -> None:
        """A table of this namespace, or of the one at netns_path (/run/netns/NAME,
        /proc/PID/ns/net)."""
        try:
            from pyroute2.netlink import NETLINK_SOCK_DIAG
            from pyroute2.netlink.diag import inet_diag_req
            from pyroute2.netlink.nlsocket import AsyncNetlinkSocket
        except ImportError as exc:
            raise TcptraceError(f"pyroute2 is not importable: {exc}") from exc

        class Request(inet_diag_req):
            # inet_diag_req_v2 followed by the optional bytecode attribute
            nla_map = ((0, "INET_DIAG_REQ_NONE", "none"), (1, "INET_DIAG_REQ_BYTECODE", "cdata"))

        table = self

        class TimedSocket(AsyncNetlinkSocket):
            def send(self, data: bytes, flags: int = 0) -> int:
                # stamped as the request leaves: pyroute2 builds it first, in Python
                table.sent_ns = time.monotonic_ns()
                return super().send(data, flags)

        self._request_class = Request
        self._loop = asyncio.new_event_loop()
        # when the last request left (monotonic ns): the kernel read its table after
        # this, and building a request takes long enough to matter (~10 ms emulated)
        self.sent_ns = 0
        # the namespace's tcp_max_tw_buckets, opened inside it (a net sysctl file
        # answers for the namespace it was opened in); None when unreadable
        self._max_tw: int | None = None
        self._max_tw_value = 1
        self._max_tw_read = -MAX_TW_REREAD_S
        try:
            with _inside(netns_path):
                self._sock = TimedSocket(NETLINK_SOCK_DIAG)
                self._sock.set_marshal(_fast_marshal())
                self._loop.run_until_complete(self._sock.bind())
                with contextlib.suppress(OSError):
                    self._max_tw = os.open(MAX_TW_BUCKETS, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._loop.close()
            where = f" in {netns_path}" if netns_path else ""
            raise TcptraceError(f"cannot open a sock_diag socket{where}: {exc}") from exc

    def makes_timewait(self) -> bool:
        """Whether a closing socket here can get a timewait socket: not when the
        namespace's net.ipv4.tcp_max_tw_buckets is 0 (then none is ever made, and
        there is nothing to ask sock_diag for). True when it cannot be read."""
        if self._max_tw is None:
            return True
        now = time.monotonic()
        if now - self._max_tw_read >= MAX_TW_REREAD_S:
            self._max_tw_read = now
            try:
                self._max_tw_value = int(os.pread(self._max_tw, 32, 0))
            except (OSError, ValueError):
                self._max_tw_value = 1
        return self._max_tw_value > 0

    def close(self) -> None:
        if self._max_tw is not None:
            os.close(self._max_tw)
            self._max_tw = None
        if self._loop.is_closed():
            return
        try:
            self._sock.close()
            # the transport finishes closing on the loop's next turn
            self._loop.run_until_complete(asyncio.sleep(0))
        finally:
            self._loop.close()

    def __enter__(self) -> SocketTable:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def dump(
        self,
        states: Iterable[int] = ALL_STATES,
        filters: Filters | None = None,
        clauses: Sequence[Sequence[tuple[str, PortRange]]] | None = None,
    ) -> list[SockEntry]:
        """TCP sockets in these states matching the filters' family and ports.

        `clauses` adds port tests (AND) to those of `filters`.
        """
        from pyroute2.netlink.exceptions import NetlinkError

        filters = filters or Filters()
        program = port_bytecode([*filter_clauses(filters), *(clauses or [])])
        bits = state_bits(states)
        rows: list[SockEntry] = []
        for family in _families(filters):
            req = self._request_class()
            req["sdiag_family"] = family
            req["sdiag_protocol"] = socket.IPPROTO_TCP
            req["idiag_states"] = bits
            req["idiag_src"] = 0
            req["idiag_dst"] = 0
            if program:
                req["attrs"] = [("INET_DIAG_REQ_BYTECODE", program)]
            try:
                rows += self._loop.run_until_complete(self._ask(req))
            except (OSError, NetlinkError) as exc:
                raise TcptraceError(f"sock_diag request failed: {exc}") from exc
        return rows

    def find(
        self, family: int, local: tuple[str, int], remote: tuple[str, int]
    ) -> SockEntry | None:
        """The socket that holds this 4-tuple now (timewait sockets included), by the
        kernel's hash look-up: a dump walks every bucket of the established table
        (262,144 here: ~1 ms of kernel time each, whatever it finds), this one."""
        from pyroute2.netlink import NLM_F_REQUEST
        from pyroute2.netlink.exceptions import NetlinkError

        req = self._request_class()
        req["sdiag_family"] = family
        req["sdiag_protocol"] = socket.IPPROTO_TCP
        req["idiag_states"] = state_bits(ALL_STATES)
        req["idiag_sport"], req["idiag_dport"] = local[1], remote[1]
        req["idiag_src"] = _request_address(family, local[0])
        req["idiag_dst"] = _request_address(family, remote[0])
        req["idiag_cookie"] = INET_DIAG_NOCOOKIE
        try:
            rows = self._loop.run_until_complete(self._ask(req, NLM_F_REQUEST))
        except NetlinkError as exc:
            if exc.code == errno.ENOENT:
                return None
            raise TcptraceError(f"sock_diag request failed: {exc}") from exc
        except OSError as exc:
            raise TcptraceError(f"sock_diag request failed: {exc}") from exc
        return rows[0] if rows else None

    async def _ask(self, req: object, flags: int = 0) -> list[SockEntry]:
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST
        from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY

        flags = flags or NLM_F_REQUEST | NLM_F_DUMP
        answer = await self._sock.nlm_request(req, SOCK_DIAG_BY_FAMILY, flags)
        return [msg[_ENTRY] async for msg in answer if _ENTRY in msg]


_ENTRY = "tcptrace_entry"


@contextlib.contextmanager
def _inside(netns_path: str | None) -> Iterator[None]:
    """Run the block in another network namespace (this thread only), then come back."""
    if netns_path is None:
        yield
        return
    from pyroute2.netns import setns

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(netns_path, os.O_RDONLY)
        try:
            setns(target, flags=0)
        finally:
            os.close(target)
        try:
            yield
        finally:
            setns(home, flags=0)
    finally:
        os.close(home)


class SocketTables:
    """One sock_diag table per network namespace (by inode), opened on first use."""

    def __init__(self, index: NetnsIndex | None = None) -> None:
        self.own = own_netns()
        self.index = index or NetnsIndex()
        self.tables: dict[int, SocketTable] = {}
        self.gone = 0  # namespaces let go because they went away
        self.unreachable = 0  # look-ups in a namespace nobody can enter any more

    def get(self, netns: int = 0) -> SocketTable | None:
        """The table of this namespace (0: ours); None when it cannot be entered."""
        netns = netns or self.own
        table = self.tables.get(netns)
        if table is not None:
            return table
        path = None
        if netns != self.own:
            found = self.index.get(netns)
            if found is None:
                self.unreachable += 1
                return None
            path = found.path
        try:
            table = SocketTable(path)
        except TcptraceError:
            if path is None:
                raise
            self.unreachable += 1  # its last process left between the scan and now
            return None
        self.tables[netns] = table
        return table

    def makes_timewait(self, netns: int = 0) -> bool:
        """SocketTable.makes_timewait of this namespace's table (0: ours); True when
        its table is not open yet (nothing is opened here)."""
        table = self.tables.get(netns or self.own)
        return table is None or table.makes_timewait()

    def namespaces(self, only: Iterable[int] = ()) -> list[int]:
        """Every namespace that can be entered now (or those of `only`), ours first."""
        known = self.index.rescan()
        wanted = set(only) or {self.own, *known}
        return sorted(wanted & ({self.own} | set(known)), key=lambda n: n != self.own)

    def prune(self) -> list[int]:
        """Let go of the tables of namespaces that have gone (no name, no process)."""
        known = self.index.rescan()
        gone = [n for n in self.tables if n != self.own and n not in known]
        for netns in gone:
            self.tables.pop(netns).close()
        self.gone += len(gone)
        return gone

    def close(self) -> None:
        for table in self.tables.values():
            table.close()
        self.tables.clear()

    def __enter__(self) -> SocketTables:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _fast_marshal():
    """pyroute2's sock_diag marshal, with socket rows decoded by `decode_answer`;
    NLMSG_DONE and errors still go through pyroute2's own parser."""
    from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, MarshalDiag

    class FastMarshal(MarshalDiag):
        def parse_one_message(self, key, flags, sequence_number, data, offset, length):
            kind = NLMSG_HEADER.unpack_from(data, offset)[1]
            if kind != SOCK_DIAG_BY_FAMILY or length < _DIAG_ANSWER_MIN:
                return super().parse_one_message(key, flags, sequence_number, data, offset, length)
            header = {
                "length": length,
                "type": kind,
                "flags": flags,
                "sequence_number": sequence_number,
                "error": None,
            }
            return {"header": header, _ENTRY: decode_answer(data, offset)}

    return FastMarshal()


class Budget:
    """Caps the share of wall time the tracer spends asking sock_diag and /proc.

    Look-ups serve rare events (sockets the kernel could not attribute, timewait
    sockets); under heavy churn they must never slow the event stream, so each
    caller checks `allows()` first and skips (and counts) what it cannot afford.
    """

    def __init__(self, fraction: float = 0.05, burst: float = 0.2) -> None:
        self.fraction = fraction
        self.burst = burst
        self.started = time.monotonic()
        self.spent = 0.0

    def allows(self) -> bool:
        return self.spent <= self.fraction * (time.monotonic() - self.started) + self.burst

    def charge(self, since: float) -> None:
        """Account the time from `since` (a time.monotonic() value) to now."""
        self.spent += time.monotonic() - since
