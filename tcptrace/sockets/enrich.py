"""Enrichment: the right owner and honest durations on every event, before output.

The kernel attributes most transitions itself (F_OWNER_KNOWN). The rest (the
first transition of a socket older than tcptrace, a child of a listener opened
before tcptrace, a socket evicted from the kernel's map) get their owner here,
as `ss -p` finds it: from the start-up snapshot, or by asking sock_diag for the
socket's inode and /proc for the process holding it. Events nobody can
attribute get pid 0 and no command, and print "-".

The kernel's owner may have exited since (a server that listened, then forked
and exited to daemonise): a socket still held whose recorded owner is gone is
looked up too, and keeps the recorded owner when nobody else holds it. Whether
a pid is alive is checked once per batch for each distinct pid, and remembered
for PID_CHECK_INTERVAL.

Several processes listening on one address (SO_REUSEPORT) leave a new child's
owner unknown in the kernel: the child is whose process holds it once accepted,
found among the listeners' processes.

A socket that existed before tracing started has no start time in the kernel;
when the snapshot saw it in the state it now leaves, the time since the
snapshot is a lower bound on its stay, marked F_DELTA_LOWER.
"""

from __future__ import annotations

import operator
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from tcptrace.filters import Filters
from tcptrace.kernel.events import F_DELTA_KNOWN, F_DELTA_LOWER, F_NETNS_KNOWN, F_OWNER_KNOWN, Event
from tcptrace.sockets.namespaces import process_netns
from tcptrace.sockets.procs import Owner, ProcessIndex
from tcptrace.sockets.snapshot import Snapshot, single_owner
from tcptrace.sockets.sockdiag import (
    LISTEN_STATES,
    LOCAL,
    REMOTE,
    Budget,
    SocketTable,
    SocketTables,
)
from tcptrace.stages import Stage
from tcptrace.states import TcpState, is_birth

CLOSE = int(TcpState.CLOSE)
LISTEN = int(TcpState.LISTEN)
SYN_RECV = int(TcpState.SYN_RECV)
# Transitions only a system call on the socket makes (by_owner() in the BPF
# program): their pid did it, alive or not since.
BY_OWNER = frozenset(
    (int(old), int(new))
    for old, new in (
        (TcpState.CLOSE, TcpState.SYN_SENT),
        (TcpState.CLOSE, TcpState.LISTEN),
        (TcpState.ESTABLISHED, TcpState.FIN_WAIT1),
        (TcpState.CLOSE_WAIT, TcpState.LAST_ACK),
        (TcpState.LISTEN, TcpState.CLOSE),
    )
)
# States a socket is in while a process still holds it: leaving one of them, a
# socket whose recorded owner is gone has another holder worth finding (after
# close() it has none: an orphan keeps its last owner's name).
HELD_STATES = frozenset(
    int(state)
    for state in (
        TcpState.LISTEN,
        TcpState.SYN_SENT,
        TcpState.SYN_RECV,
        TcpState.ESTABLISHED,
        TcpState.CLOSE_WAIT,
    )
)
WILDCARDS = ("0.0.0.0", "::")
# States of a socket no process holds yet while it waits in its listener's queue.
UNACCEPTED_STATES = frozenset(
    int(state) for state in (TcpState.SYN_RECV, TcpState.ESTABLISHED, TcpState.CLOSE_WAIT)
)
_BOTH_KNOWN = F_OWNER_KNOWN | F_DELTA_KNOWN
# Positions in an Event tuple, for the per-event checks (C-level indexing).
_NEW = Event._fields.index("newstate")
_SKADDR = Event._fields.index("skaddr")
_skaddr = operator.itemgetter(_SKADDR)
_flags = operator.itemgetter(Event._fields.index("flags"))
_pid = operator.itemgetter(Event._fields.index("pid"))
# Owners found in user space, by socket; bounded (oldest dropped first).
MAX_CACHED = 16384
# After a failed look-up, do not ask again for the same socket this soon (seconds).
RETRY_AFTER = 1.0
# Who holds an exited owner's listener now, remembered this long (seconds).
HEIR_CACHE_S = 1.0
# That a pid has exited, remembered this long (seconds).
PID_CHECK_INTERVAL = 1.0
# pids whose liveness is remembered; bounded (the oldest dropped first)
MAX_PIDS = 4096


class Owners(Stage):
    """Fills in pid/comm for events the kernel could not attribute; lower-bound durations."""

    def __init__(
        self,
        filters: Filters,
        tables: SocketTables | None,
        procs: ProcessIndex | None = None,
        budget: Budget | None = None,
        take_snapshot: bool = True,
        netns_fallback: bool = False,
        seed_listeners: Callable[[list], int] | None = None,
    ) -> None:
        self.filters = filters
        self.tables = tables
        # the kernel cannot read sockets' namespaces: take each owner's (/proc/PID/ns/net)
        self.netns_fallback = netns_fallback
        # tells the kernel about listeners older than tracing (loader.Probe.seed_listeners)
        self.seed_listeners = seed_listeners
        self.owner_netns: dict[int, int] = {}  # pid -> its namespace, for the fallback
        self.procs = procs or ProcessIndex()
        self.budget = budget or Budget()
        self.take_snapshot = take_snapshot
        self.snapshot: Snapshot | None = None
        # told the start-up snapshot once taken (sockets.acceptors: shared listeners)
        self.on_snapshot: Callable[[Snapshot], None] | None = None
        self.found: dict[int, Owner] = {}  # skaddr -> owner
        self.failed: dict[int, float] = {}  # skaddr -> monotonic time of the miss
        # (exited owner, family, local address, port) of a child -> (the process
        # holding its listener now, monotonic time)
        self.heirs: dict[tuple[int, int, int, bytes, int], tuple[Owner, float]] = {}
        # pid -> (alive, monotonic time of the check)
        self.checked: dict[int, tuple[bool, float]] = {}
        self.resolved = 0
        self.unresolved = 0

    def on_start(self) -> None:
        if self.tables is not None and self.take_snapshot:
            from tcptrace.sockets import snapshot

            self.snapshot = snapshot.take(self.tables, self.procs, self.filters)
            if self.seed_listeners is not None:
                # the kernel then names their children itself, and knows an address
                # several processes listen on (SO_REUSEPORT) as such
                self.seed_listeners(self.snapshot.listening())
            if self.on_snapshot is not None:
                self.on_snapshot(self.snapshot)

    def on_events(self, events: list[Event]) -> list[Event] | None:
        found, failed = self.found, self.failed
        gone = self._gone(events)
        if found or failed or gone:
            sockets = set(map(_skaddr, events))
            if gone or not (sockets.isdisjoint(found) and sockets.isdisjoint(failed)):
                # a cached socket may close in this batch, or an owner has gone:
                # every event, in order
                return self._enrich(events, range(len(events)), gone)
        # the hot path: the kernel knew everything (one C-level pass over the flags)
        if self.netns_fallback:
            needy = range(len(events))
        else:
            needy = [
                i
                for i, flags in enumerate(map(_flags, events))
                if flags & _BOTH_KNOWN != _BOTH_KNOWN
            ]
        if not needy:
            return None
        out = self._enrich(events, needy, gone)
        if found or failed:
            # a socket looked up just now may have closed later in the batch, in an
            # event the kernel knew all of (so not among the needy)
            for ev in events:
                if ev[_NEW] == CLOSE:
                    found.pop(ev[_SKADDR], None)
                    failed.pop(ev[_SKADDR], None)
        return out

    def _gone(self, events: list[Event]) -> set[int]:
        """The batch's pids whose process has exited. A live pid is asked again in the
        next batch (a daemonising server exits a moment after its listen()); a gone one
        is remembered for PID_CHECK_INTERVAL (one system call per distinct pid)."""
        checked = self.checked
        now = time.monotonic()
        gone: set[int] = set()
        for pid in set(map(_pid, events)):
            if not pid:  # idle task: not a process
                continue
            seen = checked.get(pid)
            if seen is not None and now - seen[1] < PID_CHECK_INTERVAL:
                gone.add(pid)
                continue
            if _alive(pid):
                checked.pop(pid, None)
                continue
            checked[pid] = (False, now)
            if len(checked) > MAX_PIDS:
                del checked[next(iter(checked))]
            gone.add(pid)
        return gone

    def _enrich(
        self, events: list[Event], which: Iterable[int], gone: set[int]
    ) -> list[Event] | None:
        """Fill in what the kernel did not know; a socket's CLOSE (its own owner found
        first) drops it from the caches, as its address may be reused."""
        out: list[Event] | None = None
        found, failed = self.found, self.failed
        for i in which:
            ev = events[i]
            flags = ev.flags
            new = ev
            if self.netns_fallback and not flags & F_NETNS_KNOWN:
                new = self._owners_netns(new)
            if (found or failed) and is_birth(ev.oldstate, ev.newstate):
                # a new socket: what is cached at its address was another's, whose
                # CLOSE the kernel skipped
                found.pop(ev.skaddr, None)
                failed.pop(ev.skaddr, None)
            if flags & _BOTH_KNOWN != _BOTH_KNOWN:
                if not flags & F_OWNER_KNOWN:
                    new = self._attribute(new)
                if not flags & F_DELTA_KNOWN and not is_birth(ev.oldstate, ev.newstate):
                    new = self._lower_bound(new)
            if (
                flags & F_OWNER_KNOWN
                and not self.filters.owner_checks  # the kernel chose by this owner
                and ev.pid in gone
                and ev.oldstate in HELD_STATES
                and (ev.oldstate, ev.newstate) not in BY_OWNER
            ):
                new = self._reattribute(new)
            if new is not ev:
                if out is None:
                    out = list(events)
                out[i] = new
            if ev.newstate == CLOSE and (found or failed):
                found.pop(ev.skaddr, None)
                failed.pop(ev.skaddr, None)
        return out

    # ------------------------------------------------------------ owners

    def _owners_netns(self, ev: Event) -> Event:
        """The namespace of the socket's owner (the kernel could not read the socket's)."""
        if not ev.flags & F_OWNER_KNOWN:
            return ev  # looked up in our own namespace; nothing better is known
        netns = self.owner_netns.get(ev.pid)
        if netns is None:
            netns = process_netns(ev.pid) or 0
            self.owner_netns[ev.pid] = netns
            _bound(self.owner_netns)
        return ev._replace(netns=netns)

    def _attribute(self, ev: Event) -> Event:
        owner = self.found.get(ev.skaddr)
        if owner is None:
            owner = self._look_up(ev)
        if owner is None:
            self.unresolved += 1
            return ev._replace(pid=0, comm=b"")
        self.resolved += 1
        return ev._replace(pid=owner.pid, comm=owner.comm.encode(), flags=ev.flags | F_OWNER_KNOWN)

    def _reattribute(self, ev: Event) -> Event:
        """The kernel's owner has exited: the process holding the socket now, if any.

        The kernel names a child after its listener's owner only while one socket
        listens on that address: for the same exited owner and address, the answer
        holds for the next children too (remembered HEIR_CACHE_S)."""
        owner = self.found.get(ev.skaddr)
        if owner is None and ev.oldstate == LISTEN:
            heir = (ev.pid, ev.netns, ev.family, ev.saddr, ev.sport)
            now = time.monotonic()
            cached = self.heirs.get(heir)
            if cached is not None and now - cached[1] < HEIR_CACHE_S:
                owner = self.found[ev.skaddr] = cached[0]
                _bound(self.found)
            else:
                owner = self._look_up(ev)
                if owner is not None:
                    self.heirs.pop(heir, None)
                    self.heirs[heir] = (owner, now)
                    _bound(self.heirs)
        elif owner is None:
            owner = self._look_up(ev)
        if owner is None or owner.pid == ev.pid:
            return ev
        started = self.procs.started_ns(owner.pid)
        if started is None or started > ev.ts_ns:
            # a process younger than the transition holds that address now: another
            # socket took it since (a port reused at once on loopback). The start time
            # is rounded down to a clock tick: one started within the same tick passes.
            return ev
        self.resolved += 1
        return ev._replace(pid=owner.pid, comm=owner.comm.encode())

    def _look_up(self, ev: Event) -> Owner | None:
        missed = self.failed.get(ev.skaddr)
        if missed is not None and time.monotonic() - missed < RETRY_AFTER:
            return None
        netns = ev.netns or (self.tables.own if self.tables is not None else 0)
        key = (netns, ev.local_addr, ev.sport, ev.remote_addr, ev.dport)
        child = ev.oldstate == LISTEN and ev.newstate == SYN_RECV
        owner = None
        if self.snapshot is not None and not child:
            # (a child's listener: the kernel knew the snapshot's, and named its owner
            # when one socket listens there; since, others may listen there too)
            row = self.snapshot.get(key)
            if row is not None:
                owner = row.owner or self.procs.owner(row.entry.inode)
        if ev.newstate == CLOSE:
            # gone: the kernel's table no longer holds it (a timewait socket has no
            # inode), and a cached answer would outlive it (its address is reused)
            return owner
        # not asked (no table, or the look-up budget is spent): ask again next time
        pending = owner is None
        if owner is None and self.tables is not None and self.budget.allows():
            owner, pending = self._ask_kernel(key, child, ev.family)
        if owner is None:
            if not pending:
                self.failed[ev.skaddr] = time.monotonic()
                _bound(self.failed)
        else:
            self.found[ev.skaddr] = owner
            _bound(self.found)
        return owner

    def _ask_kernel(
        self, key: tuple[int, str, int, str, int], child: bool, family: int
    ) -> tuple[Owner | None, bool]:
        """sock_diag for this socket (or, for a new child, its listener), then /proc.

        Asked in the socket's namespace and family only (a child has its listener's).
        Also says whether the socket still waits to be accepted: no process holds it
        yet, and a later look-up may find one."""
        assert self.tables is not None
        started = time.monotonic()
        try:
            table = self.tables.get(key[0])
            if table is None:
                return None, False  # its namespace has gone, or nobody can enter it
            ends = key[1:]
            listeners = None
            if child:
                listeners, complete = self._listener_owners(table, ends[0], ends[1], family)
                owner = single_owner(listeners)
                if owner is not None and complete:
                    return owner, False
                if not listeners:
                    return None, not complete
                # several processes listen here (SO_REUSEPORT): whoever accepted it
            return self._socket_owner(table, ends, family, listeners)
        finally:
            self.budget.charge(started)

    def _listener_owners(
        self, table: SocketTable, local_addr: str, local_port: int, family: int
    ) -> tuple[list[Owner], bool]:
        """Owners of the listeners a connection to this address and port reaches:
        those on the exact address, else on the wildcard; and whether every one was
        found (a listener opened a moment ago may be newer than /proc's last scan)."""
        rows = table.dump(
            LISTEN_STATES,
            replace(self.filters, family=family),
            [[(LOCAL, (local_port, local_port))]],
        )
        exact = [r for r in rows if r.local_addr == local_addr]
        rows = exact or [r for r in rows if r.local_addr in WILDCARDS]
        owners = [self.procs.owner(r.inode, fresh=True) for r in rows if r.inode]
        return [o for o in owners if o is not None], None not in owners

    def _socket_owner(
        self,
        table: SocketTable,
        key: tuple[str, int, str, int],
        family: int,
        listeners: list[Owner] | None,
    ) -> tuple[Owner | None, bool]:
        """The process holding the socket with this 4-tuple. An accepted socket is
        sought among its listeners' processes first: /proc's full scan runs at a
        bounded rate and may not know it yet."""
        local_addr, local_port, _, remote_port = key
        clauses = [[(LOCAL, (local_port, local_port))], [(REMOTE, (remote_port, remote_port))]]
        rows = [r for r in table.dump(filters=Filters(family=family), clauses=clauses)
                if r.key == key]  # fmt: skip
        owners = []
        pending = False
        for row in rows:
            if not row.inode:
                pending = pending or row.state in UNACCEPTED_STATES
                continue
            owner = self.procs.owner(row.inode)
            if owner is None:
                if listeners is None:
                    listeners, _ = self._listener_owners(table, local_addr, local_port, family)
                owner = self.procs.holder(row.inode, sorted({o.pid for o in listeners}))
            # accept() gives the socket its inode a moment before the descriptor
            # that /proc shows: nobody found yet may be somebody soon
            pending = pending or owner is None
            owners.append(owner)
        return single_owner(owners), pending

    # ------------------------------------------------------------ durations

    def seen_since(self, key: tuple[int, str, int, str, int], state: int) -> int | None:
        """When the start-up snapshot saw this socket in this state (None: it did not):
        a lower bound on the start of its stay there."""
        if self.snapshot is None:
            return None
        netns = key[0] or (self.tables.own if self.tables is not None else 0)
        row = self.snapshot.get((netns, *key[1:]))
        if row is None or row.entry.state != state:
            return None
        return self.snapshot.taken_ns

    def _lower_bound(self, ev: Event) -> Event:
        if self.snapshot is None:
            return ev
        netns = ev.netns or (self.tables.own if self.tables is not None else 0)
        row = self.snapshot.get((netns, ev.local_addr, ev.sport, ev.remote_addr, ev.dport))
        if row is None or row.entry.state != ev.oldstate or ev.ts_ns < self.snapshot.taken_ns:
            return ev
        return ev._replace(
            delta_ns=ev.ts_ns - self.snapshot.taken_ns, flags=ev.flags | F_DELTA_LOWER
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, not ours
        return True
    return True


def _bound(cache: dict) -> None:
    while len(cache) > MAX_CACHED:
        del cache[next(iter(cache))]
