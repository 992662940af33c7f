"""Owners: the user-space fallback for transitions the kernel could not attribute."""

from __future__ import annotations

import socket

from tcptrace.enrich import MAX_CACHED, Owners
from tcptrace.events import F_DELTA_KNOWN, F_OWNER_KNOWN, Event
from tcptrace.filters import Filters
from tcptrace.procs import Owner
from tcptrace.sockdiag import SockEntry
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
        return list(self.rows)


class FakeProcs:
    def owner(self, inode: int) -> Owner | None:
        return SERVER if inode == 1001 else None

    def holder(self, inode: int, pids: list[int]) -> Owner | None:
        return SERVER if inode == 1001 and SERVER.pid in pids else None


def event(old: S, new: S, skaddr: int = 0xFFFF0001, flags: int = F_DELTA_KNOWN) -> Event:
    return Event(1, 5, skaddr, 0, flags, LOOPBACK, LOOPBACK, 80, 40000, socket.AF_INET,
                 int(old), int(new), b"")  # fmt: skip


def owners() -> tuple[Owners, FakeTable]:
    table = FakeTable()
    stage = Owners(Filters(), table, FakeProcs(), take_snapshot=False)  # type: ignore[arg-type]
    stage.on_start()
    return stage, table


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
