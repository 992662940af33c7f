"""--stuck with real sockets: a CLOSE_WAIT leak, a SYN_SENT held by a full accept
queue, sockets older than tracing, and sockets that move on in time (never reported)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from .cmd import Lines, Running
from .netutil import free_port

pytestmark = pytest.mark.usefixtures("bpf_ready")


# The walk forced into user space runs on the host only: the host's kernel refuses
# iterators, so both params walk there as here; the guests' kernels run their
# iterator in the other param (the CI's budget: ~100 s of the Debian 12 guest).
USER_ON_HOST = pytest.param("user", marks=pytest.mark.host_only)


@pytest.fixture(autouse=True, params=["kernel", USER_ON_HOST])
def map_scan(request, monkeypatch) -> str:
    """Each test with the machine's own walk of the socket map (the kernel's iterator,
    or user space where the kernel refuses it) and with the user-space walk forced."""
    if request.param == "user":
        monkeypatch.setenv("TCPTRACE_MAP_SCAN", "user")
    return request.param


REPO = __file__.rsplit("/tests/", 1)[0]
# the scan runs every shortest threshold, at most every second (sockets/stuck.py)
SCAN_S = 1.0
# scheduling, start-up and the report's own path on a shared machine
SLACK_S = 1.0


def start_leaky(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.leaky", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "listening"
    return proc


def leak_one(port: int, server: subprocess.Popen) -> float:
    """Connect and close: the server's end goes to CLOSE_WAIT and stays. Returns when."""
    client = socket.create_connection(("127.0.0.1", port))
    server.stdout.readline()  # "accepted N": the server holds it
    client.close()
    return time.monotonic()


def finish(tracer: Running, out: Lines) -> tuple[int, str]:
    """Ctrl-C, then every line the reader thread has (it alone reads stdout)."""
    tracer.proc.send_signal(signal.SIGINT)
    code = tracer.proc.wait(timeout=30)
    out.join(10)
    return code, tracer.stderr_head + tracer.proc.stderr.read()


def stuck_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "STUCK in" in line]


def test_close_wait_leak_is_reported_with_the_servers_pid_once() -> None:
    port = free_port()
    server = start_leaky(port)
    tracer = Running("--stuck", "CLOSE_WAIT=2s", "-p", str(port), "-n")
    try:
        tracer.wait_ready()
        out = Lines(tracer.proc.stdout)
        entered = leak_one(port, server)
        out.wait_for("STUCK in CLOSE_WAIT", 1, timeout=2 + SCAN_S + SLACK_S + 5)
        seen = time.monotonic()
        time.sleep(2.5)  # more scans: the socket is reported once, not each scan
        code, err = finish(tracer, out)
    finally:
        server.kill()
    assert code == 0, err
    reports = stuck_lines(out.lines)
    # once while tracing, once in the table at exit
    assert len(reports) == 2, out.lines
    report = reports[0]
    assert re.search(rf"\s{server.pid}\s+python", report), report
    assert f"127.0.0.1:{port}" in report
    age = re.search(r"STUCK in CLOSE_WAIT\s+(\S+)s$", report)
    assert age and not age.group(1).startswith(">="), report
    assert 2.0 <= float(age.group(1)) <= 2.0 + SCAN_S + SLACK_S, report
    # within one scan interval of crossing 2 s (and the time to read the line)
    assert seen - entered <= 2.0 + SCAN_S + SLACK_S
    assert "1 still stuck at exit, oldest first:" in out.lines
    assert "0 transitions traced" not in err  # the kernel counted the connection


def test_syn_sent_behind_a_full_accept_queue_is_reported() -> None:
    port = free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    filler = socket.create_connection(("127.0.0.1", port))  # fills the queue, never accepted
    tracer = Running("--stuck", "SYN_SENT=1s", "-p", str(port), "-n")
    try:
        tracer.wait_ready()
        out = Lines(tracer.proc.stdout)
        stuck = socket.socket()
        stuck.setblocking(False)
        assert stuck.connect_ex(("127.0.0.1", port)) == 115  # EINPROGRESS: SYN_SENT
        out.wait_for("STUCK in SYN_SENT", 1, timeout=1 + SCAN_S + SLACK_S + 5)
        code, err = finish(tracer, out)
    finally:
        for sock in (listener, filler):
            sock.close()
    stuck.close()
    assert code == 0, err
    report = stuck_lines(out.lines)[0]
    # the kernel saw connect() in this process
    assert re.search(rf"\s{os.getpid()}\s", report), report
    assert f"127.0.0.1:{port}" in report.split("STUCK")[0].split()[-1], report


def test_a_socket_that_moves_on_in_time_is_never_reported() -> None:
    port = free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(8)
    tracer = Running("--stuck", "CLOSE_WAIT=1500ms", "-p", str(port), "-n")
    try:
        tracer.wait_ready()
        out = Lines(tracer.proc.stdout)
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        client.close()
        time.sleep(0.7)  # in CLOSE_WAIT, then closed well before 1.5 s
        accepted.close()
        time.sleep(1.5 + 2 * SCAN_S)
        code, err = finish(tracer, out)
    finally:
        listener.close()
    assert code == 0, err
    assert stuck_lines(out.lines) == [], out.lines
    assert "no socket is stuck at exit" in out.lines
    assert "CLOSE_WAIT " in err or "CLOSE_WAIT" in "\n".join(out.lines)  # summary counted it


def test_sockets_older_than_tracing_have_a_lower_bound() -> None:
    port = free_port()
    server = start_leaky(port)
    try:
        leak_one(port, server)
        tracer = Running("--stuck", "CLOSE_WAIT=1s", "-p", str(port), "-n")
        tracer.wait_ready()
        out = Lines(tracer.proc.stdout)
        out.wait_for("STUCK in CLOSE_WAIT", 1, timeout=1 + SCAN_S + SLACK_S + 5)
        code, err = finish(tracer, out)
    finally:
        server.kill()
    assert code == 0, err
    report = stuck_lines(out.lines)[0]
    assert re.search(r"STUCK in CLOSE_WAIT\s+>=\d", report), report
    assert re.search(rf"\s{server.pid}\s", report), report


def test_json_watchdog_records() -> None:
    port = free_port()
    server = start_leaky(port)
    tracer = Running("--stuck", "CLOSE_WAIT=1s", "-p", str(port), "--json")
    try:
        tracer.wait_ready()
        out = Lines(tracer.proc.stdout)
        leak_one(port, server)
        out.wait_for('"type":"stuck"', 1, timeout=1 + SCAN_S + SLACK_S + 5)
        code, err = finish(tracer, out)
    finally:
        server.kill()
    assert code == 0, err
    records = [json.loads(line) for line in out.lines]
    kinds = [r["type"] for r in records]
    assert kinds == ["stuck", "still_stuck", "summary"], kinds
    stuck = records[0]
    assert stuck["state"] == "CLOSE_WAIT" and stuck["pid"] == server.pid
    assert stuck["local_port"] == port and stuck["age_lower_bound"] is False
    assert stuck["age_ns"] >= 1_000_000_000
    assert records[1]["age_ns"] > stuck["age_ns"]
    assert records[2]["written"] is None  # no transition records with --stuck alone


def test_live_table_and_metrics_show_the_oldest() -> None:
    port = free_port()
    metrics_port = free_port()
    server = start_leaky(port)
    tracer = Running(
        "-i", "0.5", "--stuck", "CLOSE_WAIT=1s", "-p", str(port), "--metrics", str(metrics_port)
    )
    try:
        tracer.wait_ready()
        out = Lines(tracer.proc.stdout)
        leak_one(port, server)
        deadline = time.monotonic() + 10
        rows: list[str] = []
        while time.monotonic() < deadline:
            rows = [line for line in out.lines if line.startswith("CLOSE_WAIT")]
            if rows and rows[-1].split()[5] == "1":
                break
            time.sleep(0.2)
        page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        code, err = finish(tracer, out)
    finally:
        server.kill()
    assert code == 0, err
    header = next(line for line in out.lines if line.startswith("STATE"))
    assert header.split()[:6] == ["STATE", "ENTER", "LEAVE", "NOW", "OLDEST", "STUCK"]
    # CLOSE_WAIT: entered 0 this frame, now 1, oldest over a second, 1 stuck
    assert rows and rows[-1].split()[5] == "1", out.lines
    assert float(rows[-1].split()[4].rstrip("s")) >= 1.0
    oldest = re.search(r'tcptrace_state_oldest_seconds\{state="CLOSE_WAIT"\} (\S+)', page)
    assert oldest and float(oldest.group(1)) >= 1.0, page
    assert 'tcptrace_sockets_stuck{state="CLOSE_WAIT"} 1.0' in page
    assert "1 still stuck at exit, oldest first:" in out.lines


@pytest.mark.parametrize("map_scan", ["kernel"], indirect=True)  # its own reason
def test_without_the_iterator_the_map_is_walked_in_user_space_and_it_says_so() -> None:
    # Without BTF the iterator's context cannot be checked, so it is not loaded (as on
    # a kernel whose policy refuses iterator programs): the same reports, from a walk
    # of the map in user space, and one line on stderr that says so.
    port = free_port()
    server = start_leaky(port)
    tracer = Running(
        "--stuck", "CLOSE_WAIT=1s", "-p", str(port), "-n", env={"TCPTRACE_BTF": "/nonexistent"}
    )
    try:
        tracer.wait_ready()
        out = Lines(tracer.proc.stdout)
        leak_one(port, server)
        out.wait_for("STUCK in CLOSE_WAIT", 1, timeout=1 + SCAN_S + SLACK_S + 5)
        time.sleep(2.5)  # more scans: reported once, the mark kept by user space
        code, err = finish(tracer, out)
    finally:
        server.kill()
    assert code == 0, err
    (notice,) = [line for line in err.splitlines() if "user space" in line]
    assert notice.startswith("tcptrace: no usable BTF"), notice
    assert notice.endswith(": the socket map is walked in user space instead"), notice
    reports = stuck_lines(out.lines)
    assert len(reports) == 2, out.lines  # once while tracing, once at exit
    assert re.search(rf"\s{server.pid}\s+python", reports[0]), reports[0]
    assert f"127.0.0.1:{port}" in reports[0]
    assert "1 still stuck at exit, oldest first:" in out.lines
