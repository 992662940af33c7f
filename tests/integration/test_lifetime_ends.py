"""--lifetime on real connections: each end's address and port as the connection had them."""

from __future__ import annotations

import json
import signal
import socket
import time

import pytest

from .cmd import Running
from .netutil import free_port, listener

pytestmark = pytest.mark.usefixtures("bpf_ready")


def passive_close_client(srv: socket.socket, port: int) -> int:
    """A client with a kernel-chosen port whose peer closes first (no TIME_WAIT on
    the client): returns the port the kernel chose."""
    cli = socket.create_connection(("127.0.0.1", port))
    chosen = cli.getsockname()[1]
    conn, _ = srv.accept()
    conn.close()
    time.sleep(0.05)
    cli.close()
    return chosen


def test_lifetime_json_has_the_clients_chosen_port():
    port = free_port()
    run = Running("--port", str(port), "-n", "--lifetime", "--json")
    run.wait_ready()
    with listener(port=port) as srv:
        chosen = passive_close_client(srv, port)
        time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    lives = [r for r in map(json.loads, out.splitlines()) if r["type"] == "lifetime"]
    assert [(r["local_port"], r["remote_port"]) for r in lives] == [(chosen, port)], out


def test_lifetime_text_has_the_clients_chosen_port():
    port = free_port()
    run = Running("--port", str(port), "-n", "-T", "none", "--lifetime")
    run.wait_ready()
    with listener(port=port) as srv:
        chosen = passive_close_client(srv, port)
        time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if "  SYN_SENT " in line]
    assert [row[2:4] for row in rows] == [[f"127.0.0.1:{chosen}", f"127.0.0.1:{port}"]], out


# (the formats differ in user space only: the guests run the text one)
@pytest.mark.parametrize(
    "fmt",
    [pytest.param([], id="text"), pytest.param(["--json"], id="json", marks=pytest.mark.host_only)],
)
def test_lifetime_count_counts_connections(fmt):
    port = free_port()
    run = Running("--port", str(port), "-n", "-T", "none", "--lifetime", "-c", "2", *fmt)
    run.wait_ready()
    with listener(port=port) as srv:
        chosen = [passive_close_client(srv, port) for _ in range(3)]
        code, out, err = run.wait(timeout=20)  # stops by itself
    assert code == 0, err
    if fmt:
        lives = [r for r in map(json.loads, out.splitlines()) if r["type"] == "lifetime"]
        assert [r["local_port"] for r in lives] == chosen[:2], out
    else:
        rows = [line.split() for line in out.splitlines() if "  SYN_SENT " in line]
        assert [row[2] for row in rows] == [f"127.0.0.1:{p}" for p in chosen[:2]], out
