"""Enrichment: the right owner and honest durations on every event, before output.

The kernel attributes most transitions itself (F_OWNER_KNOWN). The rest (the
first transition of a socket older than tcptrace, a child of a listener opened
before tcptrace, a socket evicted from the kernel's map) get their owner here,
as `ss -p` finds it: from the start-up snapshot, or by asking sock_diag for the
socket's inode and /proc for the process holding it. Events nobody can
attribute get pid 0 and no command, and print "-".

A socket that existed before tracing started has no start time in the kernel;
when the snapshot saw it in the state it now leaves, the time since the
snapshot is a lower bound on its stay, marked F_DELTA_LOWER.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Iterable
from dataclasses import replace

from tcptrace.events import F_DELTA_KNOWN, F_DELTA_LOWER, F_NETNS_KNOWN, F_OWNER_KNOWN, Event
from tcptrace.filters import Filters
from tcptrace.namespaces import process_netns
from tcptrace.procs import Owner, ProcessIndex
from tcptrace.snapshot import Snapshot, single_owner
from tcptrace.sockdiag import LISTEN_STATES, LOCAL, REMOTE, Budget, SocketTables
from tcptrace.states import TcpState, is_birth
from tcptrace.tracer import Stage

CLOSE = int(TcpState.CLOSE)
LISTEN = int(TcpState.LISTEN)
SYN_RECV = int(TcpState.SYN_RECV)
_BOTH_KNOWN = F_OWNER_KNOWN | F_DELTA_KNOWN
# Positions in an Event tuple, for the per-event checks (C-level indexing).
_NEW = Event._fields.index("newstate")
_SKADDR = Event._fields.index("skaddr")
_skaddr = operator.itemgetter(_SKADDR)
_flags = operator.itemgetter(Event._fields.index("flags"))
# Owners found in user space, by socket; bounded (oldest dropped first).
MAX_CACHED = 16384
# After a failed look-up, do not ask again for the same socket this soon (seconds).
RETRY_AFTER = 1.0


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
    ) -> None:
        self.filters = filters
        self.tables = tables
        # the kernel cannot read sockets' namespaces: take each owner's (/proc/PID/ns/net)
        self.netns_fallback = netns_fallback
        self.owner_netns: dict[int, int] = {}  # pid -> its namespace, for the fallback
        self.procs = procs or ProcessIndex()
        self.budget = budget or Budget()
        self.take_snapshot = take_snapshot
        self.snapshot: Snapshot | None = None
        self.found: dict[int, Owner] = {}  # skaddr -> owner
        self.failed: dict[int, float] = {}  # skaddr -> monotonic time of the miss
        self.resolved = 0
        self.unresolved = 0

    def on_start(self) -> None:
        if self.tables is not None and self.take_snapshot:
            from tcptrace import snapshot

            self.snapshot = snapshot.take(self.tables, self.procs, self.filters)

    def on_events(self, events: list[Event]) -> list[Event] | None:
        found, failed = self.found, self.failed
        if found or failed:
            sockets = set(map(_skaddr, events))
            if not (sockets.isdisjoint(found) and sockets.isdisjoint(failed)):
                # a cached socket may close in this batch: every event, in order
                return self._enrich(events, range(len(events)))
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
        out = self._enrich(events, needy)
        if found or failed:
            # a socket looked up just now may have closed later in the batch, in an
            # event the kernel knew all of (so not among the needy)
            for ev in events:
                if ev[_NEW] == CLOSE:
                    found.pop(ev[_SKADDR], None)
                    failed.pop(ev[_SKADDR], None)
        return out

    def _enrich(self, events: list[Event], which: Iterable[int]) -> list[Event] | None:
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
            if flags & _BOTH_KNOWN != _BOTH_KNOWN:
                if not flags & F_OWNER_KNOWN:
                    new = self._attribute(new)
                if not flags & F_DELTA_KNOWN and not is_birth(ev.oldstate, ev.newstate):
                    new = self._lower_bound(new)
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

    def _look_up(self, ev: Event) -> Owner | None:
        missed = self.failed.get(ev.skaddr)
        if missed is not None and time.monotonic() - missed < RETRY_AFTER:
            return None
        netns = ev.netns or (self.tables.own if self.tables is not None else 0)
        key = (netns, ev.local_addr, ev.sport, ev.remote_addr, ev.dport)
        child = ev.oldstate == LISTEN and ev.newstate == SYN_RECV
        owner = None
        if self.snapshot is not None:
            if child:
                owner = self.snapshot.listener_owner(netns, ev.local_addr, ev.sport)
            else:
                row = self.snapshot.get(key)
                if row is not None:
                    owner = row.owner or self.procs.owner(row.entry.inode)
        if ev.newstate == CLOSE:
            # gone: the kernel's table no longer holds it (a timewait socket has no
            # inode), and a cached answer would outlive it (its address is reused)
            return owner
        if owner is None and self.tables is not None and self.budget.allows():
            owner = self._ask_kernel(key, child, ev.family)
        if owner is None:
            self.failed[ev.skaddr] = time.monotonic()
            _bound(self.failed)
        else:
            self.found[ev.skaddr] = owner
            _bound(self.found)
        return owner

    def _ask_kernel(
        self, key: tuple[int, str, int, str, int], child: bool, family: int
    ) -> Owner | None:
        """sock_diag for this socket (or, for a new child, its listener), then /proc.

        Asked in the socket's namespace and family only (a child has its listener's):
        one request."""
        assert self.tables is not None
        started = time.monotonic()
        try:
            netns, local_addr, local_port, _, remote_port = key
            table = self.tables.get(netns)
            if table is None:
                return None  # its namespace has gone, or nobody can enter it
            if child:
                rows = table.dump(
                    LISTEN_STATES,
                    replace(self.filters, family=family),
                    [[(LOCAL, (local_port, local_port))]],
                )
                rows = [r for r in rows if r.local_addr in (local_addr, "0.0.0.0", "::")]
            else:
                clauses = [
                    [(LOCAL, (local_port, local_port))],
                    [(REMOTE, (remote_port, remote_port))],
                ]
                rows = table.dump(filters=Filters(family=family), clauses=clauses)
                rows = [r for r in rows if r.key == key[1:]]
            return single_owner(self.procs.owner(r.inode) for r in rows if r.inode)
        finally:
            self.budget.charge(started)

    # ------------------------------------------------------------ durations

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


def _bound(cache: dict) -> None:
    while len(cache) > MAX_CACHED:
        del cache[next(iter(cache))]
