"""Socket owners from /proc, and the start-up snapshot that uses them: on a fake /proc."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tcptrace.sockets import snapshot
from tcptrace.sockets.procs import Owner, ProcessIndex, scan_sockets
from tcptrace.sockets.sockdiag import SockEntry
from tcptrace.states import TcpState


def fake_process(proc: Path, pid: int, comm: str, fds: dict[int, str]) -> None:
    (proc / str(pid) / "fd").mkdir(parents=True)
    (proc / str(pid) / "comm").write_text(comm + "\n")
    for fd, target in fds.items():
        os.symlink(target, proc / str(pid) / "fd" / str(fd))


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    fake_process(tmp_path, 300, "nginx", {3: "socket:[1001]", 4: "socket:[1002]", 5: "/dev/null"})
    fake_process(tmp_path, 7, "systemd", {9: "socket:[1002]"})  # passed down: lowest pid wins
    fake_process(tmp_path, 41, "curl", {3: "socket:[2001]", 4: "pipe:[77]"})
    (tmp_path / "self").mkdir()  # not a pid
    return tmp_path


def test_scan_maps_socket_inodes_to_the_lowest_pid(proc: Path) -> None:
    found = scan_sockets(str(proc))
    assert found == {
        1001: Owner(300, "nginx"),
        1002: Owner(7, "systemd"),
        2001: Owner(41, "curl"),
    }


def test_scan_shares_one_owner_per_process(tmp_path: Path) -> None:
    fake_process(tmp_path, 5, "server", {fd: f"socket:[{500 + fd}]" for fd in range(3, 200)})
    found = scan_sockets(str(tmp_path))
    assert len(found) == 197
    assert len({id(owner) for owner in found.values()}) == 1


def test_scan_of_a_missing_proc_is_empty(tmp_path: Path) -> None:
    assert scan_sockets(str(tmp_path / "absent")) == {}


def test_index_rescans_on_a_miss_at_a_bounded_rate(proc: Path) -> None:
    index = ProcessIndex(min_interval=3600, proc=str(proc))
    assert index.owner(1001) == Owner(300, "nginx")
    assert index.scans == 1
    fake_process(proc, 500, "late", {3: "socket:[3001]"})
    assert index.owner(3001) is None  # a miss within min_interval does not rescan
    assert index.scans == 1
    assert ProcessIndex(min_interval=0, proc=str(proc)).owner(3001) == Owner(500, "late")
    assert index.owner(0) is None


class FakeTable:
    """SocketTables of one namespace, OWN, holding these sockets."""

    own = 4026531840

    def __init__(self, entries: list[SockEntry]) -> None:
        self.entries = entries

    def namespaces(self, only=()) -> list[int]:
        return [self.own]

    def get(self, netns: int = 0) -> FakeTable:
        return self

    def dump(self, states=None, filters=None, clauses=None) -> list[SockEntry]:
        return self.entries


def entry(state: TcpState, local_port: int, remote_port: int, inode: int) -> SockEntry:
    remote = "0.0.0.0" if state == TcpState.LISTEN else "127.0.0.1"
    return SockEntry(2, int(state), "127.0.0.1", local_port, remote, remote_port, inode, 0, 0, 0, 0)


def test_snapshot_names_owners_and_orders_by_lifecycle(proc: Path) -> None:
    index = ProcessIndex(proc=str(proc))
    table = FakeTable(
        [
            entry(TcpState.ESTABLISHED, 40000, 80, 2001),
            entry(TcpState.LISTEN, 80, 0, 1001),
            entry(TcpState.TIME_WAIT, 40001, 80, 0),
        ]
    )
    snap = snapshot.take(table, index)  # type: ignore[arg-type]
    assert [row.entry.state for row in snap.rows] == [
        TcpState.LISTEN,
        TcpState.ESTABLISHED,
        TcpState.TIME_WAIT,
    ]
    assert [row.owner for row in snap.rows] == [Owner(300, "nginx"), Owner(41, "curl"), None]
    assert snap.listening() == [(FakeTable.own, 2, "127.0.0.1", 80, [Owner(300, "nginx")])]
    assert snap.get((FakeTable.own, "127.0.0.1", 40000, "127.0.0.1", 80)).owner == Owner(41, "curl")
    assert all(row.netns == FakeTable.own for row in snap.rows)


def test_snapshot_without_owned_sockets_skips_the_proc_walk(proc: Path) -> None:
    index = ProcessIndex(proc=str(proc))
    snapshot.take(FakeTable([]), index)  # type: ignore[arg-type]
    snapshot.take(FakeTable([entry(TcpState.TIME_WAIT, 40001, 80, 0)]), index)  # type: ignore[arg-type]
    assert index.scans == 0


def test_holder_looks_at_the_given_processes_only_and_remembers(proc: Path) -> None:
    index = ProcessIndex(min_interval=3600, proc=str(proc))
    index.refresh()
    fake_process(proc, 500, "worker", {3: "socket:[3001]"})  # since the scan
    assert index.owner(3001) is None  # the scan is rate-limited
    assert index.holder(3001, [41, 999]) is None  # not theirs; 999 does not exist
    assert index.holder(3001, [41, 500]) == Owner(500, "worker")
    assert index.owner(3001) == Owner(500, "worker")
    assert index.scans == 1


def test_an_owner_that_exited_since_the_scan_is_not_its_sockets_owner(proc: Path) -> None:
    # a server that listened, then forked and exited: the scan saw the parent
    index = ProcessIndex(min_interval=3600, proc=str(proc))
    assert index.owner(1001) == Owner(300, "nginx")
    shutil.rmtree(proc / "300")
    fake_process(proc, 301, "nginx", {3: "socket:[1001]"})
    # the owner it saw has exited: a new scan at once, though none is due yet
    assert index.owner(1001) == Owner(301, "nginx")
    assert index.scans == 2
