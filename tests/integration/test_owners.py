"""The right process on every line: two named processes, sockets older than tcptrace."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .cmd import Running
from .netutil import free_port

pytestmark = pytest.mark.usefixtures("bpf_ready")

PEERS = Path(__file__).with_name("peers.py")


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


# the listener's own lines, not a connection's
LISTENER_OWN = {("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")}

FORKED_SERVER = """
import os, socket, sys, time
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(64)
workers = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:  # a worker: accepts, answers, reads to the client's FIN, closes
        while True:
            conn, _ = srv.accept()
            conn.recv(1)
            conn.sendall(b"y")
            while conn.recv(64):
                pass
            conn.close()
    workers.append(pid)
print(os.getpid(), *workers, flush=True)
time.sleep(120)  # the master never accepts
"""


def test_a_listener_shared_across_fork_names_the_worker_not_the_master():
    """nginx-like: the master listens, forks two workers that accept, and never accepts
    itself; it started before tcptrace. Every line once named the master, which served
    no connection."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", FORKED_SERVER, str(port)], stdout=subprocess.PIPE, text=True
    )
    workers: list[int] = []
    try:
        master, *workers = (int(p) for p in server.stdout.readline().split())
        run = Running("--port", str(port), "--json")
        run.wait_ready()
        for _ in range(20):
            cli = socket.create_connection(("127.0.0.1", port))
            cli.sendall(b"x")
            cli.recv(1)  # accepted: a worker answered
            cli.shutdown(socket.SHUT_WR)
            cli.recv(1)  # the worker's close
            cli.close()
        time.sleep(0.5)
        code, out, err = run.stop(signal.SIGINT)
    finally:
        for pid in (server.pid, *workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.wait()
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    served = [r for r in records if r["type"] == "transition" and r["local_port"] == port]
    served = [r for r in served if (r["old"], r["new"]) not in LISTENER_OWN]
    seen = [(r["old"], r["new"], r["pid"]) for r in served]
    assert len(served) == 20 * 5, seen
    assert master not in {r["pid"] for r in served}, (master, workers, seen)
    # the handshake's first line (on Linux 6.1 its remote end is not set yet)
    assert {r["pid"] for r in served if r["old"] == "LISTEN"} <= set(workers), seen
    by_conn: dict[int, list[dict]] = {}
    for r in served:
        if r["old"] != "LISTEN":
            by_conn.setdefault(r["remote_port"], []).append(r)
    for lines in by_conn.values():
        closer = next(r["pid"] for r in lines if r["old"] == "CLOSE_WAIT")
        assert closer in workers
        # after the accept, every line names the worker that accepted
        after = [r["pid"] for r in lines if r["old"] in ("ESTABLISHED", "CLOSE_WAIT", "LAST_ACK")]
        assert set(after) == {closer}, [(r["old"], r["new"], r["pid"], r["note"]) for r in lines]


REUSEPORT_SERVER = """
import os, socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
print(os.getpid(), flush=True)
while True:
    c, _ = s.accept()
    c.recv(1)
    c.sendall(b"y")
    while c.recv(64):
        pass
    c.close()
"""


def test_so_reuseport_children_name_their_acceptor_on_every_line():
    """Two processes in one SO_REUSEPORT group: 6 of 8 children once had pid null on
    their handshake lines (their close lines were right)."""
    port = free_port()
    servers = [
        subprocess.Popen(
            [sys.executable, "-c", REUSEPORT_SERVER, str(port)], stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        pids = {int(s.stdout.readline()) for s in servers}
        run = Running("--port", str(port), "--json")
        run.wait_ready()
        for _ in range(8):
            cli = socket.create_connection(("127.0.0.1", port))
            cli.sendall(b"x")
            cli.recv(1)
            cli.shutdown(socket.SHUT_WR)
            cli.recv(1)
            cli.close()
        time.sleep(0.5)
        code, out, err = run.stop(signal.SIGINT)
    finally:
        for s in servers:
            s.kill()
            s.wait()
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    served = [r for r in records if r["type"] == "transition" and r["local_port"] == port]
    served = [r for r in served if (r["old"], r["new"]) not in LISTENER_OWN]
    assert len(served) == 8 * 5
    assert {r["pid"] for r in served if r["old"] == "LISTEN"} <= pids
    by_conn: dict[int, set] = {}
    for r in served:
        if r["old"] != "LISTEN":
            by_conn.setdefault(r["remote_port"], set()).add(r["pid"])
    assert all(len(owners) == 1 and owners <= pids for owners in by_conn.values()), by_conn
