"""The right process on every line: two named processes, sockets older than tcptrace."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .cmd import Running
from .netutil import free_port

pytestmark = pytest.mark.usefixtures("bpf_ready")

PEERS = Path(__file__).with_name("peers.py")
# fcntl.F_SETPIPE_SZ (Python 3.10+), and a pipe's smallest size: one page
F_SETPIPE_SZ = 1031
PIPE_PAGE = 4096


class Peer:
    """peers.py in its own process, named `name`, once its socket is ready."""

    def __init__(self, role: str, port: int, name: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(PEERS), role, str(port), name, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.said: list[str] = []
        while True:
            line = self.proc.stdout.readline()
            assert line, f"{role} exited early"
            if line.strip() == "ready":
                break
            self.said.append(line.strip())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def wait(self) -> None:
        assert self.proc.wait(timeout=10) == 0


def transitions(out: str) -> list[list[str]]:
    """Lines of `tcptrace -n -T none` as [pid, comm, local, remote, old, new, duration]."""
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 8 and parts[5] == "->":
            rows.append([*parts[:5], parts[6], parts[7]])
    return rows


def owner_by_port(rows: list[list[str]], port: int) -> dict[str, set[tuple[str, str]]]:
    """For each line, who owns it according to its local port: the server's or not."""
    found: dict[str, set[tuple[str, str]]] = {"server": set(), "client": set()}
    for pid, comm, local, *_ in rows:
        side = "server" if local.endswith(f":{port}") else "client"
        found[side].add((pid, comm))
    return found


def test_two_named_processes_each_line_names_its_owner():
    port = free_port()
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    server = Peer("server", port, "tt-server")
    client = Peer("client", port, "tt-client")
    client.wait()
    server.wait()
    time.sleep(0.5)  # the FIN_WAIT2 -> TIME_WAIT poll
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    rows = transitions(out)
    got = [(r[4], r[5]) for r in rows]
    # listener 2, accepted socket 5, client 5 (its end relabelled as TIME_WAIT)
    assert len(rows) == 12, out
    assert ("FIN_WAIT2", "TIME_WAIT") in got and ("FIN_WAIT2", "CLOSE") not in got
    owners = owner_by_port(rows, port)
    assert owners["server"] == {(str(server.pid), "tt-server")}, out
    assert owners["client"] == {(str(client.pid), "tt-client")}, out


def test_sockets_older_than_tcptrace_get_owner_and_lower_bound():
    """A connection made before start: the server's ESTABLISHED -> CLOSE_WAIT runs in
    softirq while the client process is current; the snapshot names the server."""
    port = free_port()
    server = Peer("server", port, "tt-server")
    client = Peer("client", port, "tt-client", "--wait")
    client_port = client.said[0]
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    held = 0.5
    time.sleep(held)
    client.go()
    client.wait()
    server.wait()
    time.sleep(0.5)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    rows = transitions(out)
    owners = owner_by_port(rows, port)
    assert owners["server"] == {(str(server.pid), "tt-server")}, out
    assert owners["client"] == {(str(client.pid), "tt-client")}, out
    first = {(r[2], r[4]): r for r in rows}
    # both sides were ESTABLISHED before tracing began: at least `held`, marked ">="
    for local in (f"127.0.0.1:{port}", f"127.0.0.1:{client_port}"):
        duration = first[(local, "ESTABLISHED")][6]
        assert duration.startswith(">="), out
        assert parse_duration(duration[2:]) >= held * 0.9
    # the listener too, and its close is the server's own
    assert first[(f"127.0.0.1:{port}", "LISTEN")][6].startswith(">=")


def parse_duration(text: str) -> float:
    """Seconds from output.format_duration's text: 850ns, 12.3µs, 1.23ms, 4.560s, 2m03s."""
    if "m" in text and text.endswith("s") and not text.endswith("ms"):
        minutes, _, seconds = text[:-1].partition("m")
        return int(minutes) * 60 + float(seconds)
    for unit, scale in (("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise ValueError(text)


def test_child_of_a_listener_older_than_tcptrace_is_the_listeners():
    port = free_port()
    server = Peer("server", port, "tt-server")
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    client = Peer("client", port, "tt-client")
    client.wait()
    server.wait()
    time.sleep(0.5)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    rows = transitions(out)
    assert ("LISTEN", "SYN_RECV") in [(r[4], r[5]) for r in rows]
    owners = owner_by_port(rows, port)
    assert owners["server"] == {(str(server.pid), "tt-server")}, out
    assert owners["client"] == {(str(client.pid), "tt-client")}, out


PREFORK = Path(__file__).with_name("prefork.py")


class Prefork:
    """prefork.py: a master that listens and WORKERS that accept, once ready."""

    def __init__(self, port: int, worker_comm: str | None = None, gated: bool = False) -> None:
        env = dict(os.environ)
        if worker_comm:
            env["PREFORK_WORKER_COMM"] = worker_comm
        if gated:
            env["PREFORK_GATED"] = "1"  # accept only on SIGUSR1
        self.proc = subprocess.Popen(
            [sys.executable, str(PREFORK), str(port)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.master = 0
        self.workers: list[int] = []
        for line in self.proc.stdout:
            role, _, pid = line.strip().partition(" ")
            if role == "ready":
                break
            if role == "master":
                self.master = int(pid)
            else:
                self.workers.append(int(pid))

    def stop(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0


def served_by(port: int, count: int) -> dict[str, int]:
    """count connections, each closed by the client once the worker said who it is:
    {client's local address: the pid of the worker that accepted it}."""

    served = {}
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as client:
            pid = int(client.makefile().readline())
            served[f"127.0.0.1:{client.getsockname()[1]}"] = pid
        time.sleep(0.01)
    return served


# Transitions of the accepted socket after accept(): the acceptor's (issue 22.1).
AFTER_ACCEPT = [("ESTABLISHED", "CLOSE_WAIT"), ("CLOSE_WAIT", "LAST_ACK"), ("LAST_ACK", "CLOSE")]
# Before it: the handshake, which no process holds yet (a listener's child).
HANDSHAKE = [("LISTEN", "SYN_RECV"), ("SYN_RECV", "ESTABLISHED")]


def test_a_forked_workers_connections_are_the_workers_after_accept():
    """nginx-like: the master listens and never accepts, its forked workers do. Every
    line of a connection after its accept names the worker (the kernel's softirq lines
    too), and --pid WORKER shows that worker's connections whole, timed.
    Before, they named the master, and --pid WORKER gave CLOSE_WAIT an unknown time."""
    port = free_port()
    whole = Running("--port", str(port), "-n", "-T", "none")
    whole.wait_ready()
    server = Prefork(port)
    assert server.master and len(server.workers) == 2
    one = server.workers[0]
    picked = Running("--port", str(port), "--pid", str(one), "-n", "-T", "none")
    picked.wait_ready()
    try:
        served = served_by(port, 20)
        time.sleep(0.5)
    finally:
        server.stop()
    results = [run.stop() for run in (whole, picked)]
    for code, _out, err in results:
        assert code == 0, err
    assert set(served.values()) == set(server.workers), served  # both accepted some
    rows = transitions(results[0][1])
    for remote, pid in served.items():
        after = [r for r in rows if r[3] == remote and (r[4], r[5]) in AFTER_ACCEPT]
        assert [(r[4], r[5]) for r in after] == AFTER_ACCEPT, (remote, rows)
        assert {int(r[0]) for r in after} == {pid}, (remote, pid, server.master, after)
    mine, births = by_connection(transitions(results[1][1]), port)
    expected = {remote for remote, pid in served.items() if pid == one}
    assert set(mine) == expected
    for remote in expected:
        lines = mine[remote]
        # whole from the handshake on (issue 22.1; the kernel kept the handshake's times):
        # this tracer's start-up snapshot saw the listener shared
        assert [(r[4], r[5]) for r in lines] == HANDSHAKE[1:] + AFTER_ACCEPT, (remote, mine)
        assert all(r[6] != "-" for r in lines), lines
        assert {int(r[0]) for r in lines} == {one}
    assert births == [str(one)] * len(expected), births


def by_connection(rows: list[list[str]], port: int) -> tuple[dict[str, list], list[str]]:
    """The server side's lines by client address, but for LISTEN -> SYN_RECV, and the
    pid columns of those: Linux 6.1 reports a child's birth before its remote end is
    set (0.0.0.0:*), so births are counted, not placed."""
    mine: dict[str, list] = {}
    births = []
    for r in rows:
        if r[2] != f"127.0.0.1:{port}":
            continue
        if (r[4], r[5]) == HANDSHAKE[0]:
            births.append(r[0])
        elif (r[4], r[5]) != ("CLOSE", "LISTEN") and (r[4], r[5]) != ("LISTEN", "CLOSE"):
            mine.setdefault(r[3], []).append(r)
    return mine, births


def trace_served(
    server: Prefork, port: int, *tracers: tuple[str, ...]
) -> tuple[dict[str, int], list[str]]:
    """Tracers with these options on the port of a pre-forked server already running,
    20 connections served (served_by), then the server and the tracers stopped: what
    was served, and each tracer's output (each must have exited 0)."""
    try:
        runs = [Running("--port", str(port), *options) for options in tracers]
        for run in runs:
            run.wait_ready()
        served = served_by(port, 20)
        time.sleep(0.5)
    finally:
        server.stop()
    outputs = []
    for run in runs:
        code, out, err = run.stop()
        assert code == 0, err
        outputs.append(out)
    return served, outputs


def check_handshakes_name_acceptors(
    rows: list[list[str]], served: dict[str, int], port: int, others: tuple[int, ...] = ()
):
    """Each connection's SYN_RECV -> ESTABLISHED names the worker that accepted it, and
    the LISTEN -> SYN_RECV lines name the same workers as often. (Linux 6.1 reports a
    child's LISTEN -> SYN_RECV before its remote end is set: 0.0.0.0:*, so those lines
    are told apart by their pids only.)"""
    for remote, pid in served.items():
        lines = [r for r in rows if r[3] == remote and (r[4], r[5]) == HANDSHAKE[1]]
        assert [int(r[0]) for r in lines] == [pid], (remote, pid, rows)
    births = [r[0] for r in rows if r[2] == f"127.0.0.1:{port}" and (r[4], r[5]) == HANDSHAKE[0]]
    # (others: the births of connections not in served)
    assert sorted(births) == sorted(str(pid) for pid in [*served.values(), *others]), births


def handshake_records(objects: list[dict], port: int) -> list[dict]:
    """The --json transition records of the handshakes of the listener on port."""
    return [
        o
        for o in objects
        if o.get("type") == "transition"
        and o["local_port"] == port
        and (o["old"], o["new"]) in HANDSHAKE
    ]


def test_a_forked_servers_handshake_lines_name_the_worker_that_accepted():
    """The nginx of issue 22.1, started before tcptrace: the master listens, two forked
    workers accept. Each connection's handshake lines (before any accept) name the
    worker that then accepted it, in text and JSON, never the master (they did)."""
    port = free_port()
    server = Prefork(port)
    served, (out, jout) = trace_served(server, port, ("-n", "-T", "none"), ("--json",))
    assert set(served.values()) == set(server.workers), served  # both accepted some
    check_handshakes_name_acceptors(transitions(out), served, port)
    objects = [json.loads(line) for line in jout.splitlines()]
    handshakes = handshake_records(objects, port)
    assert sorted((o["pid"], o["note"]) for o in handshakes) == sorted(
        (pid, None) for pid in served.values() for _ in HANDSHAKE
    ), handshakes


def fill(fd: int) -> None:
    """Write newlines into a pipe until it is full (its reader sees empty lines)."""
    os.set_blocking(fd, False)
    try:
        while True:
            os.write(fd, b"\n" * 4096)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(fd, True)


# how long a handshake waits for its accept is user space's (sockets/acceptors.py): the
# host runs it (the CI's budget: ~17 s of the Debian 12 guest)
@pytest.mark.host_only
def test_a_stalled_output_does_not_cut_short_a_handshakes_wait_for_its_accept():
    """The CI run's --json tracer, its stdout read only at the end: once the pipe
    filled, a connection's handshake lines held for its accept went out a second
    later unnamed, marked shared, naming the master. The tracer had been blocked
    writing the lines read with them; the accept record was in the ring, not read
    yet. A stall of the output is not the accept's lateness."""
    port = free_port()
    server = Prefork(port, gated=True)
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", F_SETPIPE_SZ), PIPE_PAGE)
    try:
        run = Running("--port", str(port), "--json", stdout=write_end)
        run.wait_ready()
        fill(write_end)  # the tracer's next line blocks until the end
        os.close(write_end)
        write_end = -1
        with socket.create_connection(("127.0.0.1", port)) as client:
            # the client's lines go out (and block); the child's wait for their accept
            time.sleep(0.5)
            os.kill(server.workers[0], signal.SIGUSR1)
            assert client.recv(64).decode().strip() == str(server.workers[0])
            time.sleep(1.5)  # the tracer stays blocked past the accept wait
        with os.fdopen(read_end, "r") as out:
            read_end = -1
            lines = []
            reader = threading.Thread(target=lambda: lines.extend(out))
            reader.start()
            time.sleep(1.0)
            code, _out, err = run.stop()
            reader.join(timeout=20)
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        server.stop()
    assert code == 0, err
    objects = [json.loads(line) for line in lines if line.strip()]
    handshakes = [
        (o["old"], o["new"], o["pid"], o["note"]) for o in handshake_records(objects, port)
    ]
    worker = server.workers[0]
    assert handshakes == [(*move, worker, None) for move in HANDSHAKE], objects


def test_an_accept_that_only_names_an_unknown_owner_does_not_share_its_listener():
    """A connection waiting in the accept queue when tcptrace starts, its client gone:
    its ESTABLISHED -> CLOSE_WAIT names no owner (a softirq's, of a socket nobody held),
    and the accept that follows tells the kernel who holds it. That once marked the
    listener shared across processes: every later handshake of this one-process server
    waited a second for an accept record that never came, then went out marked
    listener_shared ("PID+"; seen under churn.c, started before tcptrace)."""
    port = free_port()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", port))
        srv.listen(8)
        early = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.1)  # established, not accepted
        run = Running("--port", str(port), "--json")
        try:
            run.wait_ready()
            early.close()  # the server's end: ESTABLISHED -> CLOSE_WAIT, no owner known
            time.sleep(0.3)
            taken, _ = srv.accept()
            taken.close()
            time.sleep(0.3)
            later = socket.create_connection(("127.0.0.1", port))
            conn, _ = srv.accept()
            conn.close()
            later.close()
            time.sleep(0.5)
        finally:
            code, out, err = run.stop()
    assert code == 0, err
    objects = [json.loads(line) for line in out.splitlines()]
    handshakes = [
        (o["old"], o["new"], o["pid"], o["note"]) for o in handshake_records(objects, port)
    ]
    assert handshakes == [(*move, os.getpid(), None) for move in HANDSHAKE], objects


def test_a_listener_shown_shared_by_an_accept_names_the_acceptor_on_later_handshakes():
    """The same server started after tcptrace: no start-up snapshot saw its listener
    shared. The first worker's accept shows it: from the next connection on, every
    handshake line names the worker that accepted."""
    port = free_port()
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    server = Prefork(port)
    try:
        first = served_by(port, 1)
        time.sleep(0.3)
        served = served_by(port, 20)
        time.sleep(0.5)
    finally:
        server.stop()
    code, out, err = run.stop()
    assert code == 0, err
    assert first and set(served.values()) == set(server.workers), served
    # the first connection's birth named the master: its listener not known shared yet
    check_handshakes_name_acceptors(transitions(out), served, port, (server.master,))


def check_one_workers_connections(
    out: str, served: dict[str, int], port: int, worker: int, comm: str | None = None
) -> list[list[str]]:
    """A tracer that picked one worker (--pid, --comm) showed exactly the connections
    it accepted, each whole from the handshake, timed and named after it (its comm
    too, when given); its server side's lines are returned."""
    mine = {remote for remote, pid in served.items() if pid == worker}
    assert mine and len(mine) < len(served), served
    rows = [r for r in transitions(out) if r[2] == f"127.0.0.1:{port}"]
    lines_of, births = by_connection(rows, port)
    assert set(lines_of) == mine, rows
    for remote in mine:
        lines = lines_of[remote]
        assert [(r[4], r[5]) for r in lines] == HANDSHAKE[1:] + AFTER_ACCEPT, (remote, rows)
        assert {int(r[0]) for r in lines} == {worker}, lines
        if comm is not None:
            assert {r[1] for r in lines} == {comm}, lines
        assert all(r[6] != "-" for r in lines), lines  # timed (a birth is not)
    assert births == [str(worker)] * len(mine), births
    return rows


def test_pid_worker_shows_its_connections_whole_from_the_handshake_and_pid_master_none():
    """Issue 22.1's nginx, started before tcptrace: --pid WORKER selects the connections
    that worker accepted from their first line (the handshake, before any accept), each
    timed, and counts them; --pid MASTER shows none of them (its listener's handshake
    lines were its own before). Before: --pid WORKER began at the accept, and --pid
    MASTER showed every handshake."""
    port = free_port()
    server = Prefork(port)
    one = server.workers[0]
    served, (out, mout) = trace_served(
        server,
        port,
        ("--pid", str(one), "-n", "-T", "none"),
        ("--pid", str(server.master), "-n", "-T", "none"),
    )
    rows = check_one_workers_connections(out, served, port, one)
    assert f"{len(rows)} transitions traced, {len(rows)} shown, 0 lost" in out, out[-600:]
    theirs = [r for r in transitions(mout) if r[3] in served]
    assert theirs == [], theirs


def test_comm_worker_shows_its_connections_whole_from_the_handshake():
    """--comm names the worker as --pid does: the kernel's accept record said whether the
    acceptor matched before it had copied the acceptor's name, so under --comm no
    acceptor of a shared listener ever matched, and each connection a worker accepted
    lost every line (one in six under emulation: CI's test_pid_and_comm_pick...)."""
    port = free_port()
    server = Prefork(port, worker_comm="tt-wk")
    one = server.workers[0]
    served, (out,) = trace_served(server, port, ("--comm", "tt-wk0", "-n", "-T", "none"))
    check_one_workers_connections(out, served, port, one, comm="tt-wk0")
