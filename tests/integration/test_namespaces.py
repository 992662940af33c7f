"""Every namespace on the host, traced from the host: each transition says where it
happened, TIME_WAIT is followed inside each namespace, and --netns, --cgroup, --pid
and --comm pick sockets by where they live and who owns them. Real namespaces
(ip netns, unshare) and a real cgroup v2 directory, no mocks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tcptrace.kernel.loader import CGROUP_BY_WALK, CGROUP_ENV, CGROUP_WALK_NS
from tcptrace.sockets.cgroups import cgroup2_mount

from .accounting import accounting_line, summary_numbers
from .cmd import Lines, Running
from .netutil import free_port, listener

pytestmark = pytest.mark.usefixtures("bpf_ready")

BURST = Path(__file__).with_name("burst.py")
CONNECTIONS = 3  # per burst: each client end goes to TIME_WAIT


@contextlib.contextmanager
def netns(name: str) -> Iterator[int]:
    """An `ip netns` namespace with loopback up; yields its inode; deleted after."""
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield os.stat(f"/run/netns/{name}").st_ino
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def burst(port: int, *prefix: str, env: dict[str, str] | None = None, count: int = 3) -> None:
    """One server and one client process making `count` short connections on 127.0.0.1."""
    done = subprocess.run(
        [*prefix, sys.executable, str(BURST), str(port), "1", str(count)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == count


def records(out: str) -> tuple[list[dict], dict]:
    parsed = [json.loads(line) for line in out.splitlines() if line.strip()]
    (summary,) = [r for r in parsed if r["type"] == "summary"]
    return [r for r in parsed if r["type"] == "transition"], summary


def name_tag() -> str:
    return f"tt{os.getpid() % 10000}"


def test_two_namespaces_with_the_same_server_each_line_names_its_own():
    port = free_port()
    a, b = f"{name_tag()}a", f"{name_tag()}b"
    with netns(a) as ino_a, netns(b) as ino_b:
        run = Running("--port", str(port), "--json")
        text = Running("--port", str(port), "-n", "-T", "none")
        run.wait_ready()
        text.wait_ready()
        burst(port, "ip", "netns", "exec", a)
        time.sleep(0.3)  # printed before the second namespace's first transition
        burst(port, "ip", "netns", "exec", b)
        time.sleep(0.5)
        code, out, err = run.stop(signal.SIGINT)
        tcode, tout, terr = text.stop(signal.SIGINT)
    assert code == 0, err
    assert tcode == 0, terr
    transitions, summary = records(out)
    by_ns = {ino_a: [], ino_b: []}
    for rec in transitions:
        assert rec["netns"] in by_ns, rec
        assert rec["netns_name"] == (a if rec["netns"] == ino_a else b), rec
        by_ns[rec["netns"]].append(rec)
    for ino, recs in by_ns.items():
        moves = [(r["old"], r["new"]) for r in recs]
        # the listener, then per connection five client and five server transitions
        assert len(recs) == 2 + CONNECTIONS * 10, (ino, moves)
        # the clients closed first: their ends were followed into TIME_WAIT in their namespace
        assert moves.count(("FIN_WAIT2", "TIME_WAIT")) == CONNECTIONS, (ino, moves)
        assert ("FIN_WAIT2", "CLOSE") not in moves, (ino, moves)
        assert all(r["pid"] and r["comm"] for r in recs), recs
    assert summary["transitions_traced"] == summary["written"] + summary["lost"]
    # the text grows the NETNS and CGROUP columns, under a new header, when the
    # second namespace's first transition comes
    lines = [line for line in tout.splitlines() if " -> " in line or "NETNS" in line]
    assert "NETNS" not in lines[0], lines[0]
    (grown,) = [i for i, line in enumerate(lines) if "NETNS" in line]
    assert lines[grown].split()[2:4] == ["NETNS", "CGROUP"], lines[grown]
    before, after = lines[1:grown], lines[grown + 1 :]
    assert before and not any({a, b} & set(line.split()) for line in before), before
    assert b in {line.split()[2] for line in after} <= {a, b}, after


def test_netns_shows_only_its_own_namespace():
    port = free_port()
    a, b = f"{name_tag()}c", f"{name_tag()}d"
    with netns(a) as ino_a, netns(b):
        run = Running("--port", str(port), "--json", "--netns", a)
        run.wait_ready()
        burst(port, "ip", "netns", "exec", b)
        burst(port, "ip", "netns", "exec", a)
        burst(port)  # the host's own namespace
        time.sleep(0.3)
        code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    transitions, summary = records(out)
    assert {r["netns"] for r in transitions} == {ino_a}
    assert len(transitions) == 2 + CONNECTIONS * 10
    assert summary["transitions_traced"] == len(transitions)


def test_a_process_under_unshare_gets_its_namespace_and_its_time_wait_followed():
    port = free_port()
    run = Running("--port", str(port), "--json")
    run.wait_ready()
    script = f'ip link set lo up && "$0" "{BURST}" {port} 1 {CONNECTIONS} && sleep 2'
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", script, sys.executable],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    transitions, _ = records(out)
    host = os.stat("/proc/self/ns/net").st_ino
    (inode,) = {r["netns"] for r in transitions}
    assert inode != host and inode > 0
    assert all(r["netns_name"] is None for r in transitions)
    moves = [(r["old"], r["new"]) for r in transitions]
    assert moves.count(("FIN_WAIT2", "TIME_WAIT")) == CONNECTIONS, moves


def test_a_namespace_deleted_while_its_sockets_are_followed_is_dropped_quietly():
    port = free_port()
    name = f"{name_tag()}e"
    run = Running("--port", str(port), "-n")
    reader = Lines(run.proc.stdout)
    run.wait_ready()
    with netns(name):
        burst(port, "ip", "netns", "exec", name)
        # deleted only once tcptrace follows its timewait sockets (an emulated CPU lags)
        reader.wait_for("FIN_WAIT2 -> TIME_WAIT", CONNECTIONS)
    time.sleep(2.5)  # deleted: tcptrace notices within a second and lets it go
    run.proc.send_signal(signal.SIGINT)
    code = run.proc.wait(timeout=30)
    reader.join(10)
    err = run.stderr_head + run.proc.stderr.read()
    assert code == 0, err
    assert "Traceback" not in err
    lines = reader.lines
    out = "\n".join(lines)
    moves = [line for line in lines if " -> " in line]
    assert sum("FIN_WAIT2 -> TIME_WAIT" in line for line in moves) == CONNECTIONS, out
    assert not any("TIME_WAIT -> CLOSE" in line for line in moves), out
    assert f"TIME_WAIT: {CONNECTIONS} followed sockets dropped with their network namespace" in out
    traced, shown, lost = summary_numbers(accounting_line(lines))
    assert traced == shown + lost


def test_lifetime_of_a_connection_whose_namespace_went_is_not_also_still_waiting():
    """--lifetime: a followed socket dropped with its deleted namespace is said once
    (dropped), not again as a connection still in TIME_WAIT at exit."""
    port = free_port()
    name = f"{name_tag()}l"
    run = Running("--port", str(port), "-n", "--lifetime")
    run.wait_ready()
    with netns(name):
        burst(port, "ip", "netns", "exec", name)
        # no line tells when they are followed: give the reader time (emulation lags)
        time.sleep(5.0 if os.environ.get("TCPTRACE_IN_VM") == "1" else 1.0)
    time.sleep(2.5)  # deleted: tcptrace notices within a second and lets it go
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    assert f"TIME_WAIT: {CONNECTIONS} followed sockets dropped with their network namespace" in out
    assert "still in TIME_WAIT at exit" not in out, out


@contextlib.contextmanager
def cgroup(name: str) -> Iterator[str]:
    """A cgroup v2 directory made for the test; yields its path below the mount."""
    mount = cgroup2_mount()
    assert mount is not None, "no cgroup2 mount in /proc/self/mountinfo"
    path = mount / name
    path.mkdir()
    try:
        yield f"/{name}"
    finally:
        for _ in range(50):  # its processes may take a moment to be reaped
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# the walk on Debian 12's guest: Debian 11's runs it as its only way
WALK_ON_HOST = pytest.param("walk", marks=pytest.mark.host_only)


@pytest.mark.parametrize("match", ["kernel", WALK_ON_HOST])
def test_cgroup_shows_only_its_sockets_and_json_names_it(match):
    """Both ways of matching a cgroup: the kernel's ancestor helper and, as where the
    kernel gives tracepoint programs none (Debian 11's 5.10), the walked map. A cgroup
    made below the filtered one after the start is matched too (the map's within its
    walk's second)."""
    port = free_port()
    mount = cgroup2_mount()
    env = {CGROUP_ENV: CGROUP_BY_WALK} if match == "walk" else {}
    with cgroup(f"{name_tag()}cg") as rel:
        run = Running("--port", str(port), "--json", "--cgroup", rel, env=env)
        run.wait_ready()
        burst(port)  # outside the cgroup
        procs = f"{mount}{rel}/cgroup.procs"
        burst(port, "sh", "-c", f'echo $$ > {procs} && exec "$0" "$@"')
        with cgroup(f"{rel.lstrip('/')}/later") as later:
            time.sleep(CGROUP_WALK_NS / 1e9 + 0.5)
            procs = f"{mount}{later}/cgroup.procs"
            burst(port, "sh", "-c", f'echo $$ > {procs} && exec "$0" "$@"')
            time.sleep(0.3)
        code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    transitions, summary = records(out)
    assert len(transitions) == 2 * (2 + CONNECTIONS * 10), [
        (r["old"], r["new"]) for r in transitions
    ]
    assert {r["cgroup"] for r in transitions} == {rel, later}
    assert all(r["container"] is None for r in transitions)
    assert summary["transitions_traced"] == len(transitions)
    # the walked map says so in one line (the kernel's way too where it must walk)
    said = [line for line in err.splitlines() if "--cgroup matches the cgroups" in line]
    if match == "walk":
        assert said == [
            f"tcptrace: {CGROUP_ENV}={CGROUP_BY_WALK}: --cgroup matches the cgroups below it "
            "by id, walked again every 1 s (a socket of a cgroup made in between may be missed)"
        ], err
    else:
        assert len(said) <= 1, err


def test_pid_and_comm_pick_their_owners_sockets():
    port = free_port()
    pid_run = Running("--port", str(port), "--json", "--pid", str(os.getpid()))
    comm_run = Running("--port", str(port), "--json", "--comm", "tt-burst")
    pid_run.wait_ready()
    comm_run.wait_ready()
    with listener(port=port) as srv:  # this process's own connection
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        cli.close()
        conn.close()
    time.sleep(0.2)
    burst(port, env={"BURST_COMM": "tt-burst"})
    burst(port)  # neither this process nor tt-burst
    time.sleep(0.3)
    code, out, err = pid_run.stop(signal.SIGINT)
    ccode, cout, cerr = comm_run.stop(signal.SIGINT)
    assert code == 0, err
    assert ccode == 0, cerr
    mine, _ = records(out)
    assert mine and {r["pid"] for r in mine} == {os.getpid()}, mine
    assert len(mine) == 2 + 10, [(r["old"], r["new"]) for r in mine]
    named, _ = records(cout)
    others = [
        (r["old"], r["new"], r["pid"], r["comm"], r["local_port"], r["remote_port"])
        for r in named
        if r["comm"] != "tt-burst"
    ]
    assert not others, f"{others} {os.getpid()}"
    moves = [(r["old"], r["new"], r["pid"], r["local_port"], r["remote_port"]) for r in named]
    assert len(named) == 2 + CONNECTIONS * 10, moves
    # tt-burst's listener is its own: the one this process had on the port before,
    # which an accept showed shared, closed first (its lines once waited a second
    # for accept records and went out marked shared; under emulation some were lost)
    shared = [m for m, r in zip(moves, named) if r["note"] == "listener_shared"]
    assert not shared, moves


def test_snapshot_lists_every_namespace_with_its_column():
    port = free_port()
    name = f"{name_tag()}s"
    serve = (
        "import socket, sys, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); print(flush=True); time.sleep(30)"
    )
    with netns(name), listener(port=port):
        inside = subprocess.Popen(
            ["ip", "netns", "exec", name, sys.executable, "-c", serve],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            inside.stdout.readline()  # listening
            every = Running("--snapshot", "-n", "--port", str(port))
            code, out, err = every.wait()
            only = Running("--snapshot", "-n", "--port", str(port), "--netns", name)
            ocode, oout, oerr = only.wait()
        finally:
            inside.kill()
            inside.wait()
    assert code == 0, err
    assert ocode == 0, oerr
    head, *rows = out.splitlines()
    assert head.split()[5:7] == ["NETNS", "CGROUP"], head
    host = str(os.stat("/proc/self/ns/net").st_ino)
    assert sorted(row.split()[5] for row in rows) == sorted([host, name]), out
    assert sorted(row.split()[3] for row in rows) == sorted([str(os.getpid()), str(inside.pid)])
    ohead, *orows = oout.splitlines()
    assert "NETNS" not in ohead and len(orows) == 1 and orows[0].split()[3] == str(inside.pid)


# the program without BTF offsets is one build on every kernel, and the owner's
# namespace is read in user space: the host runs it (the CI's budget: ~17 s a guest)
@pytest.mark.host_only
def test_without_btf_the_owners_namespace_stands_in_and_says_so():
    port = free_port()
    name = f"{name_tag()}f"
    with netns(name) as inode:
        run = Running("--port", str(port), "--json", env={"TCPTRACE_BTF": "/nonexistent/btf"})
        run.wait_ready()
        # the owners live on a while: the fallback reads their /proc/PID/ns/net
        burst(port, "ip", "netns", "exec", name, env={"BURST_LINGER": "3"})
        code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    assert err.count("cannot read sockets' network namespaces") == 1, err
    assert "each socket's namespace is its owner's /proc/PID/ns/net" in err
    transitions, _ = records(out)
    assert len(transitions) == 2 + CONNECTIONS * 10
    # every owner is known here (the processes live on until their sockets close)
    assert {r["netns"] for r in transitions} == {inode}, {r["netns"] for r in transitions}


def test_netns_filter_without_btf_is_a_clear_error():
    run = Running("--netns", "/proc/self/ns/net", env={"TCPTRACE_BTF": "/nonexistent/btf"})
    code, _, err = run.wait()
    assert code == 1
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert line.startswith("tcptrace: --netns needs the kernel to read each socket's network")


def test_lifetimes_carry_their_namespace():
    port = free_port()
    name = f"{name_tag()}l"
    with netns(name) as inode:
        run = Running("--port", str(port), "--json", "--lifetime")
        run.wait_ready()
        burst(port, "ip", "netns", "exec", name)
        time.sleep(0.3)
        code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    lives = [json.loads(line) for line in out.splitlines() if '"type":"lifetime"' in line]
    # the server's ends close; the clients' wait in TIME_WAIT (60 s), not finished yet
    assert len(lives) == CONNECTIONS, out
    assert {(life["netns"], life["netns_name"]) for life in lives} == {(inode, name)}


@pytest.mark.parametrize("family", ["-4", "-6"])
def test_the_namespace_check_passes_whatever_the_family_filter(family: str) -> None:
    """The start-up check listens on an IPv4 socket of tcptrace's own: a family filter
    must not hide it from the program (tcptrace -6 used to fall back on owners'
    namespaces, saying the kernel could not read them)."""
    run = Running(family, "-p", str(free_port()), "-d", "0.5")
    code, _, err = run.wait()
    assert code == 0, err
    assert "cannot read sockets' network namespaces" not in err, err


THREAD_CONNECTS = """
import ctypes, socket, sys, threading
port = int(sys.argv[1])
def worker():
    libc = ctypes.CDLL(None)
    libc.prctl(15, b"worker-1", 0, 0, 0)  # PR_SET_NAME: this thread's name only
    c = socket.create_connection(("127.0.0.1", port))
    c.close()
t = threading.Thread(target=worker)
t.start()
t.join()
"""


def test_comm_is_the_process_name_not_a_threads():
    """A python3 process whose connecting thread is named worker-1: ps -o comm says
    the process's name, and so must --comm and the COMM column. Once --comm missed
    it, and the line named the thread."""
    port = free_port()
    process = Path(sys.executable).name[:15]  # the name ps -o comm shows
    run = Running("--port", str(port), "--json", "--comm", process)
    run.wait_ready()
    with listener(port=port) as srv:
        client = subprocess.Popen([sys.executable, "-c", THREAD_CONNECTS, str(port)])
        conn, _ = srv.accept()
        conn.close()
        assert client.wait(timeout=30) == 0
    time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    transitions, _ = records(out)
    client_side = [r for r in transitions if r["pid"] == client.pid]
    assert client_side, [(r["pid"], r["comm"], r["old"], r["new"]) for r in transitions]
    assert {r["comm"] for r in client_side} == {process}
    assert ("CLOSE", "SYN_SENT") in [(r["old"], r["new"]) for r in client_side]
