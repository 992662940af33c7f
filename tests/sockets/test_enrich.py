"""Owners: the user-space fallback for transitions the kernel could not attribute."""

from __future__ import annotations

import socket
import subprocess

from tcptrace.filters import Filters
from tcptrace.kernel.events import F_DELTA_KNOWN, F_OWNER_KNOWN, Event
from tcptrace.sockets.enrich import MAX_CACHED, Owners
from tcptrace.sockets.procs import Owner
from tcptrace.sockets.sockdiag import SockEntry
from tcptrace.states import TcpState as S

LOOPBACK = socket.inet_aton("127.0.0.1").ljust(16, b"\0")
SERVER = Owner(300, "nginx")


class FakeTable:
    """The kernel's socket table: one ESTABLISHED server socket, inode 1001."""

    def __init__(self) -> None:
        self.dumps = 0
        self.families: list[int] = []
        self.rows = [SockEntry(2, int(S.ESTABLISHED), "127.0.0.1", 80, "127.0.0.1", 40000,
                               1001, 0, 0, 0, 0)]  # fmt: skip

    def dump(self, states=None, filters=None, clauses=None) -> list[SockEntry]:
        self.dumps += 1
        self.families.append(filters.family)
        return [r for r in self.rows if states is None or r.state in states]


class FakeTables(FakeTable):
    """SocketTables of one namespace (ours), whose table is the fake above."""

    own = 4026531840

    def get(self, netns: int = 0):
        assert netns in (0, self.own)
        return self

    def namespaces(self, only=()) -> list[int]:
        return [self.own]


class FakeProcs:
    """inode 1001 is SERVER's, found by /proc's scan; `held` only by looking at
    the candidate processes' descriptors (the scan ran too recently)."""

    def __init__(self) -> None:
        self.by_inode = {1001: SERVER}
        self.shared: set[int] = set()  # inodes several processes hold
        self.held: dict[int, Owner] = {}
        self.started: dict[int, int] = {}

    def owner(self, inode: int, fresh: bool = False) -> Owner | None:
        return self.by_inode.get(inode)

    def holder(self, inode: int, pids: list[int]) -> Owner | None:
        owner = self.held.get(inode) or self.by_inode.get(inode)
        return owner if owner is not None and owner.pid in pids else None

    def started_ns(self, pid: int) -> int | None:
        return self.started.get(pid, -(10**12))  # long before any event, unless told


def event(
    old: S, new: S, skaddr: int = 0xFFFF0001, flags: int = F_DELTA_KNOWN, pid: int = 0
) -> Event:
    return Event(1, 5, skaddr, 0, pid, flags, 0, 0, LOOPBACK, LOOPBACK, 80, 40000,
                 socket.AF_INET, int(old), int(new), b"gone" if pid else b"")  # fmt: skip


def owners() -> tuple[Owners, FakeTable]:
    table = FakeTables()
    stage = Owners(Filters(), table, FakeProcs(), take_snapshot=False)  # type: ignore[arg-type]
    stage.on_start()
    return stage, table


def exited_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def entry(state: S, local: str, port: int, remote_port: int, inode: int) -> SockEntry:
    remote = "0.0.0.0" if state == S.LISTEN else "127.0.0.1"
    return SockEntry(2, int(state), local, port, remote, remote_port, inode, 0, 0, 0, 0)


def test_known_events_pass_untouched() -> None:
    stage, table = owners()
    batch = [event(S.CLOSE, S.SYN_SENT, flags=F_OWNER_KNOWN | F_DELTA_KNOWN)]
    assert stage.on_events(batch) is None
    assert table.dumps == 0


def test_softirq_transition_is_looked_up_once_and_cached() -> None:
    stage, table = owners()
    (ev,) = stage.on_events([event(S.SYN_RECV, S.ESTABLISHED)])
    assert (ev.pid, ev.comm, ev.owner_known) == (300, b"nginx", True)
    (again,) = stage.on_events([event(S.ESTABLISHED, S.CLOSE_WAIT)])
    assert again.pid == 300
    assert table.dumps == 1
    assert table.families == [socket.AF_INET]  # one request: the socket's own family
    # its CLOSE still gets the owner from the cache, then the cache forgets the socket
    (last,) = stage.on_events([event(S.LAST_ACK, S.CLOSE)])
    assert last.pid == 300
    assert not stage.found and table.dumps == 1


def test_a_new_socket_at_a_closed_ones_address_is_looked_up_afresh() -> None:
    stage, table = owners()
    stage.on_events([event(S.SYN_RECV, S.ESTABLISHED)])
    table.rows = []  # the server socket is gone; a client of another process takes its address
    first, second = stage.on_events(
        [event(S.LAST_ACK, S.CLOSE), event(S.SYN_SENT, S.ESTABLISHED, flags=0)]
    )
    assert first.pid == 300
    assert second.pid == 0 and not second.owner_known
    assert table.dumps == 2


def test_a_closed_socket_is_not_asked_for_nor_remembered() -> None:
    # an evicted connecting socket closed: it is gone from the kernel's table, so a
    # look-up would only spend the budget, and a cached miss would grow without bound
    stage, table = owners()
    batch = [event(S.SYN_SENT, S.CLOSE, skaddr=0xFFFF0000 + i, flags=0) for i in range(100)]
    out = stage.on_events(batch)
    assert out is not None and all(ev.pid == 0 and not ev.owner_known for ev in out)
    assert table.dumps == 0
    assert not stage.found and not stage.failed
    assert stage.unresolved == 100


def test_caches_stay_bounded() -> None:
    stage, table = owners()
    table.rows = []  # every look-up misses
    stage.budget.allows = lambda: True  # type: ignore[method-assign]
    batch = [event(S.SYN_RECV, S.ESTABLISHED, skaddr=i) for i in range(MAX_CACHED + 10)]
    stage.on_events(batch)
    assert len(stage.failed) == MAX_CACHED


def test_a_socket_looked_up_and_closed_in_one_batch_is_forgotten() -> None:
    # its CLOSE came with everything known (the kernel had the owner by then), so
    # the batch's needy events alone do not include it
    stage, table = owners()
    known = F_OWNER_KNOWN | F_DELTA_KNOWN
    first, *_ = stage.on_events(
        [
            event(S.SYN_RECV, S.ESTABLISHED),
            event(S.ESTABLISHED, S.FIN_WAIT1, flags=known),
            event(S.FIN_WAIT2, S.CLOSE, flags=known),
        ]
    )
    assert first.pid == 300 and table.dumps == 1
    assert not stage.found and not stage.failed


KNOWN = F_OWNER_KNOWN | F_DELTA_KNOWN


def test_an_owner_that_has_exited_is_replaced_by_the_socket_holder() -> None:
    # a server that listened, then forked and exited: the kernel names its children
    # after the exited process; the socket is the daemon's now
    stage, table = owners()
    gone = exited_pid()
    child = event(S.LISTEN, S.SYN_RECV, flags=F_OWNER_KNOWN, pid=gone)
    table.rows.append(entry(S.LISTEN, "0.0.0.0", 80, 0, 1001))
    (ev,) = stage.on_events([child])
    assert (ev.pid, ev.comm, ev.owner_known) == (300, b"nginx", True)
    # the socket's later events: from the cache, no new look-up
    dumps = table.dumps
    (later,) = stage.on_events([event(S.SYN_RECV, S.ESTABLISHED, flags=KNOWN, pid=gone)])
    assert later.pid == 300 and table.dumps == dumps
    # the listener's next children: its owner is remembered, no new look-up
    more = [event(S.LISTEN, S.SYN_RECV, skaddr=i, flags=F_OWNER_KNOWN, pid=gone) for i in (7, 8)]
    assert [ev.pid for ev in stage.on_events(more)] == [300, 300]
    assert table.dumps == dumps


def test_a_process_younger_than_the_transition_is_not_its_heir() -> None:
    # the exited owner's 4-tuple was taken at once by a new process's socket (ports
    # are reused at once on loopback): that process did not hold this socket
    stage, table = owners()
    gone = exited_pid()
    stage.procs.started[300] = 10**9  # the process holding the 4-tuple now: 1 s after
    # the event stands as the kernel gave it (on_events: None, nothing replaced)
    assert stage.on_events([event(S.ESTABLISHED, S.CLOSE_WAIT, flags=KNOWN, pid=gone)]) is None
    assert table.dumps == 1


def test_an_exited_owners_own_calls_and_orphans_keep_its_name() -> None:
    stage, table = owners()
    gone = exited_pid()
    batch = [
        event(S.CLOSE, S.LISTEN, skaddr=1, flags=F_OWNER_KNOWN, pid=gone),  # its listen()
        event(S.FIN_WAIT1, S.FIN_WAIT2, skaddr=2, flags=KNOWN, pid=gone),  # after its close()
    ]
    assert stage.on_events(batch) is None
    assert table.dumps == 0
    # nobody holds the socket now: the recorded owner stays
    table.rows = []
    held = event(S.ESTABLISHED, S.CLOSE_WAIT, skaddr=3, flags=KNOWN, pid=gone)
    assert stage.on_events([held]) is None
    assert table.dumps == 1


def test_a_live_owner_is_asked_again_and_a_gone_one_remembered(monkeypatch) -> None:
    # a daemonising server exits a moment after its listen(): alive in one batch,
    # gone in the next, and its children must go to whoever holds them then
    from tcptrace.sockets import enrich

    stage, table = owners()
    alive, asked = [True], []
    monkeypatch.setattr(enrich, "_alive", lambda pid: asked.append(pid) or alive[0])
    batch = [event(S.SYN_RECV, S.ESTABLISHED, skaddr=i, flags=KNOWN, pid=77) for i in range(50)]
    assert stage.on_events(batch) is None
    assert asked == [77] and table.dumps == 0  # one system call for the batch's one pid
    alive[0] = False
    stage.on_events(batch)
    assert asked == [77, 77] and 77 in stage.checked and table.dumps > 0
    stage.on_events(batch)
    assert asked == [77, 77]  # remembered as gone


def test_the_snapshots_listeners_are_handed_to_the_kernel() -> None:
    from tcptrace.sockets.sockdiag import SockEntry as Row

    tables = FakeTables()
    tables.rows = [
        Row(2, int(S.LISTEN), "0.0.0.0", 80, "0.0.0.0", 0, 1001, 0, 0, 0, 0),
        Row(2, int(S.LISTEN), "127.0.0.1", 81, "0.0.0.0", 0, 1001, 0, 0, 0, 0),
        Row(2, int(S.LISTEN), "127.0.0.1", 81, "0.0.0.0", 0, 1002, 0, 0, 0, 0),
    ]
    seeded: list = []

    class Procs(FakeProcs):
        def refresh(self) -> None:
            pass  # the fake /proc is what it is

    stage = Owners(Filters(), tables, Procs(), seed_listeners=seeded.extend)  # type: ignore[arg-type]
    stage.on_start()
    assert sorted(seeded) == [
        (tables.own, 2, "0.0.0.0", 80, [SERVER]),
        (tables.own, 2, "127.0.0.1", 81, [SERVER, None]),  # SO_REUSEPORT: two sockets
    ]


def test_a_new_socket_does_not_inherit_what_was_cached_at_its_address() -> None:
    # the kernel skipped the old socket's CLOSE: its cached owner must not name the new one
    stage, table = owners()
    stage.found[0xFFFF0001] = Owner(999, "old")
    table.rows = [entry(S.LISTEN, "127.0.0.1", 80, 0, 1001)]
    (ev,) = stage.on_events([event(S.LISTEN, S.SYN_RECV, flags=0)])
    assert ev.pid == 300


def test_reuseport_child_is_the_acceptors_among_the_listeners_processes() -> None:
    stage, table = owners()
    other = Owner(301, "nginx")
    stage.procs.by_inode[1002] = other  # type: ignore[attr-defined]
    stage.procs.held[1003] = SERVER  # type: ignore[attr-defined]  # accepted since /proc's scan
    table.rows = [
        entry(S.LISTEN, "127.0.0.1", 80, 0, 1001),
        entry(S.LISTEN, "127.0.0.1", 80, 0, 1002),
        entry(S.ESTABLISHED, "127.0.0.1", 80, 40000, 1003),
    ]
    (ev,) = stage.on_events([event(S.LISTEN, S.SYN_RECV, flags=0)])
    assert ev.pid == 300


def test_a_child_not_accepted_yet_is_asked_for_again() -> None:
    stage, table = owners()
    stage.procs.by_inode[1002] = Owner(301, "nginx")  # type: ignore[attr-defined]
    table.rows = [
        entry(S.LISTEN, "127.0.0.1", 80, 0, 1001),
        entry(S.LISTEN, "127.0.0.1", 80, 0, 1002),
        entry(S.SYN_RECV, "127.0.0.1", 80, 40000, 0),  # in the accept queue: no inode
    ]
    (ev,) = stage.on_events([event(S.LISTEN, S.SYN_RECV, flags=0)])
    assert ev.pid == 0 and not stage.failed
    table.rows[2] = entry(S.ESTABLISHED, "127.0.0.1", 80, 40000, 1001)  # accepted
    (ev,) = stage.on_events([event(S.SYN_RECV, S.ESTABLISHED, flags=0)])
    assert ev.pid == 300


def test_the_listener_on_the_exact_address_wins_over_the_wildcard() -> None:
    stage, table = owners()
    stage.procs.by_inode[1002] = Owner(301, "other")  # type: ignore[attr-defined]
    table.rows = [
        entry(S.LISTEN, "0.0.0.0", 80, 0, 1002),
        entry(S.LISTEN, "127.0.0.1", 80, 0, 1001),
    ]
    (ev,) = stage.on_events([event(S.LISTEN, S.SYN_RECV, flags=0)])
    assert ev.pid == 300


def test_with_owner_filters_the_kernels_owner_stands() -> None:
    # --comm, --pid, --cgroup: the kernel chose the line by its owner; user space never
    # names another process for it
    stage, table = owners()
    stage.filters = Filters(comms=frozenset({"gone"}))
    gone = exited_pid()
    assert stage.on_events([event(S.ESTABLISHED, S.CLOSE_WAIT, flags=KNOWN, pid=gone)]) is None
    assert table.dumps == 0
