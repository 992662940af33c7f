"""--interval through the real command: counts in a pipe, colour only on a terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import time

import pytest

from .cmd import Lines, Running
from .netutil import free_port
from .test_command import connect_and_close

pytestmark = pytest.mark.usefixtures("bpf_ready")

SGR = re.compile(r"\x1b\[[0-9;]*m")
CLEAR = "\x1b[H\x1b[2J"
INTERVAL = 0.3
CONNECTIONS = 3


def frames(out: str) -> list[dict[str, list[str]]]:
    """Each table as {state: [ENTER, LEAVE, NOW, OLDEST, p50, p90, p99]}."""
    tables = []
    for block in out.split("\n\n"):
        lines = block.splitlines()
        if len(lines) < 2 or not lines[0].startswith("tcptrace "):
            continue
        tables.append({line.split()[0]: line.split()[1:] for line in lines[2:]})
    return tables


def test_table_in_a_pipe_counts_real_connections_without_colour():
    port = free_port()
    run = Running("--port", str(port), "--interval", str(INTERVAL))
    reader = Lines(run.proc.stdout)
    run.wait_ready()
    for _ in range(CONNECTIONS):
        connect_and_close(port, hold=0)
    # Three more frames: the last covers the last transition. Counted, not slept for:
    # under emulation (the VM of .ci/run) frames come late, and a fixed 1.5 s gave 0-2.
    shown = sum(line.startswith("tcptrace ") for line in reader.lines)
    reader.wait_for("tcptrace ", shown + 3, at_start=True)
    run.proc.send_signal(signal.SIGINT)
    code = run.proc.wait(timeout=30)
    reader.join(10)
    err = run.stderr_head + run.proc.stderr.read()
    assert code == 0, err
    out = "\n".join(reader.lines)
    assert "\x1b" not in out  # neither colour nor cursor movement in a pipe
    tables = frames(out)
    assert len(tables) >= 3
    enter = lambda state: sum(int(t[state][0]) for t in tables if state in t)  # noqa: E731
    leave = lambda state: sum(int(t[state][1]) for t in tables if state in t)  # noqa: E731
    assert enter("SYN_SENT") == leave("SYN_SENT") == CONNECTIONS
    assert enter("ESTABLISHED") == leave("ESTABLISHED") == 2 * CONNECTIONS
    assert enter("LISTEN") == leave("LISTEN") == CONNECTIONS  # each connect_and_close listens
    assert all(t[state][2] == "0" for t in tables[-1:] for state in ("ESTABLISHED", "LISTEN"))
    busy = next(t for t in tables if "SYN_SENT" in t and int(t["SYN_SENT"][1]))
    assert busy["SYN_SENT"][4].endswith(("ns", "µs", "ms"))  # a p50 for those that left
    # OLDEST: no socket is left in SYN_SENT at the end
    assert tables[-1]["SYN_SENT"][3] == "-"
    # the exit summary follows the last table
    assert out.splitlines()[-1] == f"{12 * CONNECTIONS} transitions traced, 0 lost"


def run_on_terminal(*args: str, env: dict[str, str] | None = None) -> str:
    """Run tcptrace with stdout on a pseudo-terminal; return what the terminal received."""
    master, slave = pty.openpty()
    run = Running(*args, stdout=slave, env=env)
    os.close(slave)
    run.wait_ready()
    received = b""
    deadline = time.monotonic() + 10
    while received.count(b"STATE") < 2 and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            received += os.read(master, 65536)
    run.proc.send_signal(signal.SIGINT)
    assert run.proc.wait(timeout=20) == 0
    while True:
        try:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                break
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    return received.decode()


@pytest.mark.host_only  # user space alone; Debian 12's guest has the host's userland
def test_colour_and_redraw_on_a_terminal():
    port = free_port()
    screen = run_on_terminal("--port", str(port), "--interval", "0.2", env={"NO_COLOR": ""})
    assert screen.startswith(CLEAR)  # redrawn in place, like top
    assert SGR.search(screen)


@pytest.mark.host_only  # user space alone; Debian 12's guest has the host's userland
@pytest.mark.parametrize("how", ["flag", "env"])
def test_no_color_on_a_terminal(how):
    args = ["--port", str(free_port()), "--interval", "0.2"]
    env = {"NO_COLOR": "1"} if how == "env" else {"NO_COLOR": ""}
    if how == "flag":
        args.append("--no-color")
    screen = run_on_terminal(*args, env=env)
    assert CLEAR in screen  # still a live view
    assert not SGR.search(screen)
