"""How tcptrace stops: SIGINT and SIGTERM (summary, exit 0), a second Ctrl-C (at once,
exit 130), Ctrl-C or SIGTERM while the program loads, a reader that goes away
(| head: quiet exit 0), and SIGKILL (nothing left attached in the kernel)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .accounting import accounting_line, assert_all_accounted, summary_numbers
from .cmd import Running
from .kernelprobe import attached_programs
from .netutil import free_port, listener

pytestmark = pytest.mark.usefixtures("bpf_ready")
# Signal handling is user space: on Debian 12's guest, whose userland is this machine's,
# only what the kernel must undo (SIGKILL) runs; the host suite runs them all.
host_only = pytest.mark.host_only


def connections(port: int, n: int) -> None:
    """n client connections to port, each accepted and closed by both ends."""
    with listener(port=port, backlog=128) as srv:
        for _ in range(n):
            cli = socket.create_connection(("127.0.0.1", port))
            conn, _ = srv.accept()
            cli.close()
            conn.close()


@host_only
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_prints_summary_and_exits_0(sig):
    port = free_port()
    run = Running("--port", str(port), "-n")
    run.wait_ready()
    connections(port, 3)
    time.sleep(0.3)
    code, out, err = run.stop(sig)
    assert code == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    last = accounting_line(lines)
    traced, shown, lost = summary_numbers(last)
    assert shown == traced and lost == 0
    assert_all_accounted(last, err, 3 * 10 + 2)  # 3 connections, listen and close
    assert any(line.startswith("SYN_SENT") for line in lines)


def fill_stdout_pipe(port: int) -> None:
    """Make tcptrace block writing: the test never reads its stdout (64 KiB pipe)."""
    connections(port, 400)  # 4,000 lines, ~400 KiB


def wait_blocked_in_write(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        if "pipe_write" in wchan:  # blocked writing stdout (anon_pipe_write on 6.18)
            return
        time.sleep(0.05)
    raise AssertionError(f"tcptrace never blocked on its output pipe (wchan {wchan!r})")


@host_only
def test_second_ctrl_c_exits_at_once_even_when_output_is_blocked():
    port = free_port()
    run = Running("--port", str(port), "-n")
    run.wait_ready()
    fill_stdout_pipe(port)
    wait_blocked_in_write(run.proc.pid)
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two separate signals (pending ones would merge into one)
    # the first Ctrl-C waits for the blocked output (the summary follows it)...
    if run.proc.poll() is not None:
        err = run.stderr_head + run.proc.stderr.read()
        raise AssertionError(f"exited {run.proc.returncode} on the first Ctrl-C: {err}")
    started = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    # ...the second leaves at once, without reading the rest
    code = run.proc.wait(timeout=5)
    elapsed = time.monotonic() - started
    err = run.stderr_head + run.proc.stderr.read()
    assert code == 130
    assert elapsed < 2, elapsed
    assert err.splitlines()[-1] == "tcptrace: interrupted twice: exiting without the summary"
    assert "Traceback" not in err


def wait_loading(pid: int, timeout: float = 30.0) -> None:
    """Until bcc's library is mapped: the program is being compiled and loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "libbcc" in Path(f"/proc/{pid}/maps").read_text():
            return
        time.sleep(0.002)
    raise AssertionError("tcptrace never loaded bcc")


@host_only
def test_ctrl_c_while_loading_exits_130_without_traceback():
    run = Running("--port", str(free_port()))
    wait_loading(run.proc.pid)
    run.proc.send_signal(signal.SIGINT)
    code, out, err = run.wait()
    assert code == 130, err
    assert "Ctrl-C to stop" not in err
    assert err.splitlines() == ["tcptrace: interrupted before tracing started"]
    assert out == ""


@host_only
def test_sigterm_while_loading_stops_once_attached_with_a_summary():
    run = Running("--port", str(free_port()))
    wait_loading(run.proc.pid)
    run.proc.send_signal(signal.SIGTERM)
    code, out, err = run.wait()
    assert code == 0, err
    assert "Traceback" not in err
    assert out.splitlines()[-1] == "0 transitions traced, 0 shown, 0 lost"


@host_only
def test_reader_going_away_exits_quietly():
    # tcptrace --port P | head -n 3
    port = free_port()
    read_end, write_end = os.pipe()
    run = Running("--port", str(port), "-n", stdout=write_end)
    head = subprocess.Popen(["head", "-n", "3"], stdin=read_end, stdout=subprocess.PIPE)
    os.close(read_end)
    os.close(write_end)  # head is now the only reader
    run.wait_ready()
    deadline = time.monotonic() + 20
    while run.proc.poll() is None and time.monotonic() < deadline:
        connections(port, 5)  # keeps writing after head has gone
        time.sleep(0.1)
    shown, _ = head.communicate(timeout=10)
    code, _, err = run.wait()
    assert code == 0
    assert len(shown.splitlines()) == 3
    assert "Traceback" not in err and "Exception ignored" not in err and "Broken pipe" not in err
    assert err.strip() == f"tracing port {port} ... Ctrl-C to stop"


def bpftool(*args: str):
    out = subprocess.run(
        ["bpftool", "-j", *args], capture_output=True, text=True, check=False, timeout=30
    )
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else None


def test_sigkill_leaves_nothing_attached():
    run = Running("--port", str(free_port()))
    run.wait_ready()
    pid = run.proc.pid
    perf = [p for p in bpftool("perf") if p["pid"] == pid]
    # the tracepoint program, the nested one for the hits the kernel skips it for, and
    # the accept hook's two where the kernel has syscall tracepoints
    assert sorted((p["fd_type"], p["tracepoint"]) for p in perf) == attached_programs()
    prog_ids = {p["prog_id"] for p in perf}
    map_ids = {m for prog in prog_ids for m in bpftool("prog", "show", "id", str(prog))["map_ids"]}
    assert len(map_ids) >= 5  # sockets, listeners, ports, counters, histograms...

    run.proc.send_signal(signal.SIGKILL)
    assert run.proc.wait(timeout=10) == -signal.SIGKILL
    deadline = time.monotonic() + 10  # the kernel frees programs and maps after an RCU period
    while time.monotonic() < deadline:
        progs_left = {p["id"] for p in bpftool("prog", "show")} & prog_ids
        maps_left = {m["id"] for m in bpftool("map", "show")} & map_ids
        attached = [p for p in bpftool("perf") if p["prog_id"] in prog_ids]
        if not (progs_left or maps_left or attached):
            break
        time.sleep(0.2)
    assert not progs_left, f"programs still loaded: {progs_left}"
    assert not maps_left, f"maps still allocated: {maps_left}"
    assert not attached


SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def wait_catchable(pid: int, timeout: float = 10.0) -> None:
    """Until the process catches SIGTERM (SigCgt in /proc/PID/status): the first
    moment tcptrace can answer a signal at all, well before click or bcc load."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:") and int(line.split()[1], 16) & SIGTERM_BIT:
                return
        time.sleep(0.001)
    raise AssertionError("tcptrace never caught SIGTERM")


def assert_clean(err: str) -> None:
    for noise in ("Traceback", "Fatal Python error", "Aborted!", "Exception ignored"):
        assert noise not in err, err


@host_only
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.15])
def test_sigterm_at_any_moment_of_start_up_ends_with_the_summary(delay):
    run = Running("--port", str(free_port()))
    wait_catchable(run.proc.pid)
    time.sleep(delay)
    run.proc.send_signal(signal.SIGTERM)
    code, out, err = run.wait()
    assert_clean(err)
    assert code == 0, err
    assert out.splitlines()[-1] == "0 transitions traced, 0 shown, 0 lost", out


@host_only
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.15])
def test_sigint_at_any_moment_of_start_up_is_one_line(delay):
    run = Running("--port", str(free_port()))
    wait_catchable(run.proc.pid)
    time.sleep(delay)
    run.proc.send_signal(signal.SIGINT)
    code, out, err = run.wait()
    assert_clean(err)
    if "Ctrl-C to stop" in err:  # already tracing (a fast start): the summary
        assert code == 0 and out.splitlines()[-1].startswith("0 transitions traced"), err
    else:
        assert (code, out, err) == (130, "", "tcptrace: interrupted before tracing started\n")
