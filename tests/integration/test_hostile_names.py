"""A process name is anybody's choice: control characters in it must never reach the
operator's terminal raw (they could forge lines or send escape sequences). Text output
shows each of them as '?', as ps does; JSON and CSV keep the name exactly."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .cmd import Running
from .netutil import free_port

# host_only: Debian 12's guest has this machine's userland (Python, bcc, click); how
# lines are written does not depend on the kernel, and the host suite runs it
pytestmark = [pytest.mark.usefixtures("bpf_ready"), pytest.mark.host_only]

HOSTILE = "t\tb\nn\x1b[31mR"  # 11 bytes: fits the kernel's 16-byte comm
SHOWN = "t?b?n?[31mR"

CHILD = textwrap.dedent(
    """
    import ctypes, socket, sys, time
    PR_SET_NAME = 15
    ctypes.CDLL(None).prctl(PR_SET_NAME, sys.argv[2].encode(), 0, 0, 0)
    port = int(sys.argv[1])
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen()
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    print("ready", flush=True)
    sys.stdin.readline()
    conn.close()  # the server closes first: the client's life ends without TIME_WAIT
    time.sleep(0.05)
    cli.close()
    srv.close()
    """
)


class NamedPeer:
    """A process named HOSTILE holding a listener and both ends of one connection."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(port), HOSTILE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline() == "ready\n"

    def finish(self) -> None:
        self.proc.communicate("\n", timeout=10)
        assert self.proc.returncode == 0


def run_with_peer(*args: str) -> tuple[str, int]:
    port = free_port()
    run = Running("--port", str(port), "-n", "-T", "none", *args)
    run.wait_ready()
    peer = NamedPeer(port)
    peer.finish()
    time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    return out, peer.proc.pid


def assert_escaped(out: str, pid: int) -> list[str]:
    """No raw control character anywhere; the peer's lines, each with the escaped name."""
    assert "\x1b" not in out and "\t" not in out
    mine = [line for line in out.splitlines() if line.split()[:1] == [str(pid)]]
    assert all(line.split()[1] == SHOWN for line in mine), out
    # a raw line break would have split one of them in two
    assert not any(line.startswith(("n", "b")) for line in out.splitlines()), out
    return mine


def test_transition_lines_escape_control_characters():
    out, pid = run_with_peer()
    # the listener's two, the client's five and the accepted socket's five before TIME_WAIT
    assert len(assert_escaped(out, pid)) >= 10, out


def test_lifetime_lines_escape_control_characters():
    out, pid = run_with_peer("--lifetime")
    assert len(assert_escaped(out, pid)) == 1, out  # the client's; the server's waits in TIME_WAIT


def test_json_keeps_the_name_exactly():
    out, pid = run_with_peer("--json")
    names = {r["comm"] for r in map(json.loads, out.splitlines()) if r.get("pid") == pid}
    assert names == {HOSTILE}


def test_snapshot_escapes_control_characters():
    port = free_port()
    peer = NamedPeer(port)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tcptrace", "--snapshot", "-n", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        peer.finish()
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\t" not in done.stdout
    rows = done.stdout.splitlines()[1:]
    assert len(rows) == 3, done.stdout  # the listener and both ends
    assert all(row.split()[-1] == SHOWN for row in rows), done.stdout
