"""The TCP sockets that exist at one moment, with their owners: what `ss -tpe` shows.

Taken once when tracing starts, so that sockets older than tcptrace get the
right owner and an honest lower bound on the time spent in their first traced
state; printed on its own by `tcptrace --snapshot`. It covers every network
namespace that can be entered (or those of --netns), as
`ip -all netns exec ss -tpen` would.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tcptrace.filters import Filters
from tcptrace.sockets.procs import Owner, ProcessIndex
from tcptrace.sockets.sockdiag import ALL_STATES, SockEntry, SocketTables
from tcptrace.states import LIFECYCLE_ORDER

# (netns, local address, local port, remote address, remote port)
Key = tuple[int, str, int, str, int]


@dataclass(frozen=True)
class SnapshotRow:
    entry: SockEntry
    owner: Owner | None
    netns: int = 0  # the namespace's inode

    @property
    def key(self) -> Key:
        return (self.netns, *self.entry.key)


@dataclass
class Snapshot:
    taken_ns: int  # CLOCK_MONOTONIC, the clock of the kernel's event timestamps
    rows: list[SnapshotRow] = field(default_factory=list)
    # (netns, port) of the listeners several processes held (workers forked after listen)
    shared_listeners: set[tuple[int, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.by_key: dict[Key, SnapshotRow] = {row.key: row for row in self.rows}
        self.listeners: dict[tuple[int, int], list[SnapshotRow]] = {}
        for row in self.rows:
            if row.entry.state == _LISTEN:
                self.listeners.setdefault((row.netns, row.entry.local_port), []).append(row)

    def get(self, key: Key) -> SnapshotRow | None:
        return self.by_key.get(key)

    def listening(self) -> list[tuple[int, int, str, int, list[Owner | None]]]:
        """(netns, family, address, port, owners of its listeners) of every listening
        address: what the kernel needs to name the children of listeners older than
        tcptrace (Probe.seed_listeners)."""
        by_address: dict[tuple[int, int, str, int], list[Owner | None]] = {}
        for rows in self.listeners.values():
            for row in rows:
                e = row.entry
                key = (row.netns, e.family, e.local_addr, e.local_port)
                by_address.setdefault(key, []).append(row.owner)
        return [(*key, owners) for key, owners in by_address.items()]


_LISTEN = 10  # TcpState.LISTEN, kept as a plain int for the hot path


def single_owner(owners: Iterable[Owner | None]) -> Owner | None:
    """The one process behind these sockets; None when unknown or ambiguous (SO_REUSEPORT)."""
    found = {owner.pid: owner for owner in owners if owner is not None}
    return next(iter(found.values())) if len(found) == 1 else None


def take(
    tables: SocketTables,
    procs: ProcessIndex | None,
    filters: Filters | None = None,
    states: Iterable[int] = ALL_STATES,
) -> Snapshot:
    """Dump the matching sockets of every namespace (or of --netns) and find the
    process holding each one (procs None: no owners, no walk of /proc)."""
    taken_ns = time.monotonic_ns()
    found: list[tuple[int, SockEntry]] = []
    for netns in tables.namespaces(filters.netns if filters else ()):
        table = tables.get(netns)
        if table is not None:
            found += [(netns, e) for e in table.dump(states, filters)]
    if procs is not None and any(e.inode for _, e in found):
        procs.refresh()  # (else the /proc walk, ms per thousand fds, finds nothing)
    owners = procs.by_inode if procs is not None else {}
    rows = [SnapshotRow(e, owners.get(e.inode) if e.inode else None, n) for n, e in found]
    order = {int(state): i for i, state in enumerate(LIFECYCLE_ORDER)}
    own = tables.own
    rows.sort(
        key=lambda r: (
            r.netns != own,
            r.netns,
            order.get(r.entry.state, 99),
            r.entry.local_port,
            r.entry.remote_port,
        )
    )
    shared = procs.shared if procs is not None else set()
    listeners = {(n, e.local_port) for n, e in found if e.state == _LISTEN and e.inode in shared}
    return Snapshot(taken_ns, rows, listeners)
