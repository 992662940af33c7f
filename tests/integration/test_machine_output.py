"""--json and --csv end to end, and output into a pipe that closes early."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import time
from datetime import datetime, timezone

import pytest

from .cmd import Running
from .netutil import free_port, listener
from .test_command import connect_and_close

# host_only: Debian 12's guest has this machine's userland (Python, bcc, click); how
# lines are written does not depend on the kernel, and the host suite runs it
pytestmark = [pytest.mark.usefixtures("bpf_ready"), pytest.mark.host_only]

# One connect and close on loopback, both ends, plus the listener: 12 transitions.
EXPECTED = sorted(
    [
        ("CLOSE", "LISTEN"),
        ("CLOSE", "SYN_SENT"),
        ("SYN_SENT", "ESTABLISHED"),
        ("LISTEN", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "FIN_WAIT1"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("FIN_WAIT1", "FIN_WAIT2"),
        # the client's active close: relabelled from the kernel's FIN_WAIT2 -> CLOSE
        ("FIN_WAIT2", "TIME_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
        ("LISTEN", "CLOSE"),
    ]
)
BIRTHS = {("CLOSE", "LISTEN"), ("CLOSE", "SYN_SENT"), ("LISTEN", "SYN_RECV")}
HOLD = 0.05


def test_json_lines_for_a_real_connection():
    port = free_port()
    run = Running("--port", str(port), "--json")
    run.wait_ready()
    started = datetime.now(timezone.utc)
    connect_and_close(port, hold=HOLD)
    time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    transitions, summary = records[:-1], records[-1]
    assert {r["type"] for r in transitions} == {"transition"}
    assert sorted((r["old"], r["new"]) for r in transitions) == EXPECTED
    for r in transitions:
        assert r["family"] == "ipv4"
        assert r["local_addr"] == "127.0.0.1"
        assert port in (r["local_port"], r["remote_port"])
        stamp = datetime.fromisoformat(r["time"].replace("Z", "+00:00"))
        assert abs((stamp - started).total_seconds()) < 5
        if (r["old"], r["new"]) in BIRTHS:
            assert r["duration_ns"] is None
        else:
            assert isinstance(r["duration_ns"], int) and r["duration_ns"] > 0
    # in the order the kernel reported them (TIME_WAIT is learnt from sock_diag, later)
    stamps = [r["ts_ns"] for r in transitions if r["new"] != "TIME_WAIT"]
    assert stamps == sorted(stamps)
    connect = next(r for r in transitions if r["new"] == "SYN_SENT")
    assert connect["pid"] == os.getpid()  # connect() ran in this very process
    held = next(r for r in transitions if (r["old"], r["new"]) == ("ESTABLISHED", "FIN_WAIT1"))
    assert held["duration_ns"] >= HOLD * 1e9
    assert summary["type"] == "summary"
    assert summary["transitions_traced"] == 12
    assert summary["written"] == 12
    assert summary["lost"] == 0
    assert summary["states"]["SYN_SENT"]["timed"] == 1
    assert sum(t["count"] for t in summary["transitions"]) == 12


def test_csv_for_a_real_connection():
    port = free_port()
    run = Running("--port", str(port), "--csv")
    run.wait_ready()
    connect_and_close(port)
    time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert out.splitlines()[0].startswith("time,ts_ns,pid,comm,family,")
    assert sorted((r["old"], r["new"]) for r in rows) == EXPECTED
    for r in rows:
        births = (r["old"], r["new"]) in BIRTHS
        assert (r["duration_ns"] == "") == births
    # the table stays pure: the human summary goes to stderr
    assert err.splitlines()[-1] == "12 transitions traced, 12 shown, 0 lost"


def clean(err: str) -> None:
    assert "Traceback" not in err
    assert "Exception ignored" not in err
    assert "Broken pipe" not in err


def test_json_into_head_exits_quietly():
    """tcptrace --json | head -3: tcptrace leaves at its next write, silently, exit 0."""
    port = free_port()
    run = Running("--port", str(port), "--json")
    head = subprocess.Popen(["head", "-3"], stdin=run.proc.stdout, stdout=subprocess.PIPE)
    run.proc.stdout.close()  # head is the only reader now
    run.wait_ready()
    connect_and_close(port, hold=0)
    lines = head.stdout.read().decode().splitlines()
    head.wait(timeout=10)
    assert len(lines) == 3 and all(json.loads(line)["type"] == "transition" for line in lines)
    # more traffic: the next write finds no reader
    with listener(port=port) as srv:
        deadline = time.monotonic() + 20
        while run.proc.poll() is None and time.monotonic() < deadline:
            socket.create_connection(("127.0.0.1", port)).close()
            srv.accept()[0].close()
            time.sleep(0.1)
    assert run.proc.wait(timeout=10) == 0
    clean(run.proc.stderr.read())


@pytest.mark.parametrize("mode", [[], ["--json"], ["--csv"], ["--interval", "60"]])
def test_summary_into_a_closed_reader_exits_quietly(mode):
    # a socket, not a pipe: nothing notices the reader leave until the summary is written
    ours, theirs = socket.socketpair()
    run = Running("--port", str(free_port()), *mode, stdout=theirs)
    theirs.close()
    run.wait_ready()
    ours.close()
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=20) == 0
    clean(run.stderr_head + run.proc.stderr.read())


@pytest.mark.parametrize("mode", [[], ["--json"], ["--csv"], ["--quiet"]])
def test_idle_pipe_whose_reader_left_ends_the_run(mode):
    """| head on a quiet port: tcptrace leaves with its reader, without waiting for traffic."""
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as child_out:
        run = Running("--port", str(free_port()), *mode, stdout=child_out)
    run.wait_ready()
    os.close(read_end)
    assert run.proc.wait(timeout=5) == 0
    clean(run.proc.stderr.read())
