"""The tcptrace command end to end: start-up line, lines, summary, stop conditions."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from .cmd import Running
from .netutil import free_port, listener

pytestmark = pytest.mark.usefixtures("bpf_ready")


def connect_and_close(port: int, hold: float = 0.02) -> None:
    with listener(port=port) as srv:
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        time.sleep(hold)
        cli.close()
        time.sleep(hold)
        conn.close()


def test_prints_transitions_and_summary_on_sigint():
    port = free_port()
    run = Running("--port", str(port), "-n")
    run.wait_ready()
    connect_and_close(port)
    time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "PID", "COMM"]
    body = [line for line in lines[1:] if "->" in line]
    assert any(f"127.0.0.1:{port}" in line and "SYN_RECV -> ESTABLISHED" in line for line in body)
    assert any("SYN_SENT -> ESTABLISHED" in line for line in body)
    assert any("CLOSE_WAIT -> LAST_ACK" in line for line in body)
    assert len(body) == 12  # listener 2, client 5, accepted 5
    assert any(line.startswith("STATE") for line in lines)
    assert lines[-1] == "12 transitions traced, 12 shown, 0 lost"


def test_sigterm_also_prints_the_summary():
    run = Running("--port", str(free_port()))
    run.wait_ready()
    code, out, _ = run.stop(signal.SIGTERM)
    assert code == 0
    assert out.splitlines()[-1] == "0 transitions traced, 0 shown, 0 lost"


def test_count_stops_by_itself():
    port = free_port()
    run = Running("--port", str(port), "--count", "3", "-T", "none")
    run.wait_ready()
    connect_and_close(port)
    code, out, _ = run.wait()
    assert code == 0
    body = [line for line in out.splitlines()[1:] if "->" in line]
    assert len(body) == 3
    # the first three transitions on the port, in order: listen(), connect(), the SYN-ACK
    assert [line.split()[-4:-1] for line in body] == [
        ["CLOSE", "->", "LISTEN"],
        ["CLOSE", "->", "SYN_SENT"],
        ["SYN_SENT", "->", "ESTABLISHED"],
    ]


def test_duration_stops_by_itself():
    start = time.monotonic()
    run = Running("--port", str(free_port()), "--duration", "1", "--quiet")
    run.wait_ready()
    code, out, _ = run.wait()
    assert code == 0
    assert 1.0 <= time.monotonic() - start < 20
    assert out.splitlines()[0].startswith("STATE")


def test_quiet_counts_in_kernel():
    port = free_port()
    run = Running("--port", str(port), "--quiet")
    run.wait_ready()
    for _ in range(3):
        connect_and_close(port, hold=0)
    time.sleep(0.2)
    code, out, _ = run.stop()
    assert code == 0
    syn = next(line for line in out.splitlines() if line.startswith("SYN_SENT")).split()
    assert syn[1] == "3"
    assert out.splitlines()[-1] == "36 transitions traced, 0 lost"
