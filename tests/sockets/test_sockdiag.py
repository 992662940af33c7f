"""sock_diag through pyroute2 on real loopback sockets: the kernel applies our port bytecode
exactly as Filters.matches_socket (the BPF program's rule) does. Needs no privilege."""

from __future__ import annotations

import os
import socket

import pytest

from tcptrace.filters import Filters
from tcptrace.sockets.procs import ProcessIndex
from tcptrace.sockets.sockdiag import (
    ALL_STATES,
    LISTEN_STATES,
    LOCAL,
    REMOTE,
    SocketTable,
    canonical_addr,
    port_bytecode,
    port_ranges,
)
from tcptrace.states import TcpState


@pytest.fixture(scope="module")
def scene():
    """Listeners on three ports (the last IPv6) and one connection to the first."""
    ports, opened = [], []
    for family, host in [(socket.AF_INET, "127.0.0.1")] * 2 + [(socket.AF_INET6, "::1")]:
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.bind((host, 0))  # the kernel picks distinct free ports
        srv.listen()
        ports.append(srv.getsockname()[1])
        opened.append(srv)
    cli = socket.create_connection(("127.0.0.1", ports[0]))
    accepted, _ = opened[0].accept()
    opened += [cli, accepted]
    yield ports, cli, accepted
    for sock in opened:
        sock.close()


@pytest.fixture(scope="module")
def table():
    with SocketTable() as t:
        yield t


def ours(rows, ports):
    return sorted(
        (r.family, r.state, r.local_port, r.remote_port)
        for r in rows
        if r.local_port in ports or r.remote_port in ports
    )


def test_the_table_shows_our_sockets(scene, table):
    ports, cli, _ = scene
    client_port = cli.getsockname()[1]
    rows = ours(table.dump(), set(ports))
    assert (socket.AF_INET, TcpState.LISTEN, ports[0], 0) in rows
    assert (socket.AF_INET6, TcpState.LISTEN, ports[2], 0) in rows
    assert (socket.AF_INET, TcpState.ESTABLISHED, client_port, ports[0]) in rows
    assert (socket.AF_INET, TcpState.ESTABLISHED, ports[0], client_port) in rows


def test_inode_leads_to_this_process(scene, table):
    _, cli, _ = scene
    # the whole 4-tuple: an older TIME_WAIT socket (inode 0) may share the local port
    local, remote = cli.getsockname()[1], cli.getpeername()[1]
    owner = ProcessIndex().owner(
        next(
            r.inode
            for r in table.dump()
            if (r.local_port, r.remote_port) == (local, remote) and r.state != TcpState.TIME_WAIT
        )
    )
    assert owner is not None and owner.pid == os.getpid()
    with open("/proc/self/comm") as f:
        assert owner.comm == f.read().strip()


@pytest.mark.parametrize(
    "make",
    [
        lambda p, c: Filters(ports=frozenset({p[0]})),
        lambda p, c: Filters(ports=frozenset({p[1], p[2]})),
        lambda p, c: Filters(local_ports=frozenset({p[0]})),
        lambda p, c: Filters(remote_ports=frozenset({p[0]})),
        lambda p, c: Filters(local_ports=frozenset({c}), remote_ports=frozenset({p[0]})),
        # nothing has the client's port locally and the second listener's remotely
        lambda p, c: Filters(local_ports=frozenset({c}), remote_ports=frozenset({p[1]})),
        lambda p, c: Filters(ports=frozenset(range(min(p), max(p) + 1))),
        lambda p, c: Filters(ports=frozenset(p), family=socket.AF_INET6),
        lambda p, c: Filters(ports=frozenset({p[0], c}), local_ports=frozenset({p[0]})),
    ],
)
def test_kernel_bytecode_matches_the_python_rule(scene, table, make):
    ports, cli, _ = scene
    client_port = cli.getsockname()[1]
    filters = make(ports, client_port)
    mine = set(ports) | {client_port}
    everything = [r for r in table.dump() if r.local_port in mine or r.remote_port in mine]
    expected = ours(
        [r for r in everything if filters.matches_socket(r.family, r.local_port, r.remote_port)],
        mine,
    )
    assert ours(table.dump(ALL_STATES, filters), mine) == expected
    assert bool(expected) == (filters.remote_ports != frozenset({ports[1]}))


def test_state_mask_is_applied_in_the_kernel(scene, table):
    ports, _, _ = scene
    rows = table.dump(LISTEN_STATES, Filters(ports=frozenset(ports)))
    assert {r.state for r in rows} == {TcpState.LISTEN}
    assert sorted(r.local_port for r in rows) == sorted(ports)


def test_extra_clauses_narrow_the_filter(scene, table):
    ports, cli, _ = scene
    client_port = cli.getsockname()[1]
    rows = table.dump(
        ALL_STATES,
        Filters(ports=frozenset({ports[0]})),
        [[(LOCAL, (client_port, client_port))]],
    )
    assert [(r.local_port, r.remote_port) for r in rows] == [(client_port, ports[0])]


def test_rows_agree_with_pyroute2s_own_decoder(scene, table):
    """decode_answer (struct) reads every field as pyroute2's generic decoder does."""
    from pyroute2 import DiagSocket

    ports, cli, _ = scene
    # an IPv4-mapped connection too: a dual-stack listener, a client over IPv4
    dual = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    dual.bind(("::", 0))
    dual.listen()
    mapped_cli = socket.create_connection(("127.0.0.1", dual.getsockname()[1]))
    mapped_srv, _ = dual.accept()
    mine = {*ports, cli.getsockname()[1], dual.getsockname()[1], mapped_cli.getsockname()[1]}

    names = ("family", "state", "src", "sport", "dst", "dport", "inode", "uid", "cookie", "timer")

    def fields(values: tuple) -> tuple | None:
        assert len(values) == len(names)
        row = dict(zip(names, values))
        if (row["sport"] not in mine and row["dport"] not in mine) or row["timer"] == 3:
            return None  # not ours, or a timewait socket that may come and go between dumps
        return (*values[:2], canonical_addr(row["src"]), row["sport"],
                canonical_addr(row["dst"]), *values[5:])  # fmt: skip

    try:
        with DiagSocket() as plain:
            plain.bind()
            theirs = {
                fields(tuple(m[f"idiag_{n}"] for n in names))
                for family in (socket.AF_INET, socket.AF_INET6)
                for m in plain.get_sock_stats(family=family, states=0xFFF)
            }
        attrs = ("family", "state", "local_addr", "local_port", "remote_addr", "remote_port")
        attrs += ("inode", "uid", "cookie", "timer")
        ours_ = {fields(tuple(getattr(r, a) for a in attrs)) for r in table.dump()}
    finally:
        for sock in (mapped_cli, mapped_srv, dual):
            sock.close()
    theirs.discard(None)
    ours_.discard(None)
    assert ours_ == theirs
    assert len(ours_) >= 8
    mapped_rows = [r for r in ours_ if r[0] == socket.AF_INET6 and r[2] == "127.0.0.1"]
    assert len(mapped_rows) == 1  # the server's end of the mapped connection, shown as IPv4
    assert all(r[6] and r[8] for r in ours_)  # inode and cookie read


def test_bytecode_layout():
    assert port_bytecode([]) == b""
    one = port_bytecode([[(LOCAL, (80, 80))]])
    assert len(one) == 16  # two port comparisons, each an op and a port slot
    two = port_bytecode([[(LOCAL, (80, 80)), (REMOTE, (443, 443))]])
    assert len(two) == 16 + 4 + 16  # a JMP over the second alternative
    assert port_ranges([5, 3, 4, 9]) == [(3, 5), (9, 9)]


def test_canonical_addr():
    assert canonical_addr("::ffff:127.0.0.1") == "127.0.0.1"
    assert canonical_addr("::1") == "::1"
    assert canonical_addr("10.0.0.1") == "10.0.0.1"
