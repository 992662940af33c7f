"""Sockets in each state now (tcptrace_sockets, the live table's NOW) while sockets that
existed before tracing started come and go: they are left out, exactly."""

from __future__ import annotations

import signal
import socket
import time

import pytest

from .cmd import Running
from .netutil import free_port, listener
from .test_live_table import frames
from .test_metrics_endpoint import metric, scrape

pytestmark = pytest.mark.usefixtures("bpf_ready")

PAIRS = 50  # connections before tracing, and as many after
INTERVAL = 0.3


def open_pairs(srv: socket.socket, port: int, n: int) -> list[tuple[socket.socket, socket.socket]]:
    pairs = []
    for _ in range(n):
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        pairs.append((cli, conn))
    return pairs


def close_pairs(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    for cli, conn in pairs:
        cli.close()
        conn.close()


def established(port: int) -> int:
    """ESTABLISHED sockets with the port at either end, from /proc/net/tcp (as ss sees them)."""
    count = 0
    with open("/proc/net/tcp") as table:
        for line in table.read().splitlines()[1:]:
            fields = line.split()
            ports = {int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)}
            if fields[3] == "01" and port in ports:
                count += 1
    return count


def churn_around(port: int, run: Running, srv: socket.socket, old: list) -> list:
    """Start-up done: open PAIRS new connections, close the old ones."""
    run.wait_ready()
    new = open_pairs(srv, port, PAIRS)
    close_pairs(old)
    time.sleep(0.3)
    assert established(port) == 2 * PAIRS
    return new


def test_gauge_counts_sockets_made_since_start_when_older_ones_close():
    port, mport = free_port(), free_port()
    with listener(port=port, backlog=2 * PAIRS) as srv:
        old = open_pairs(srv, port, PAIRS)
        run = Running("--port", str(port), "-q", "--metrics", str(mport))
        new = churn_around(port, run, srv, old)
        found = scrape(mport)
        close_pairs(new)
    run.stop(signal.SIGINT)
    assert metric(found, "tcptrace_sockets", state="ESTABLISHED") == 2 * PAIRS
    # the listener predates tracing: left out
    assert metric(found, "tcptrace_sockets", state="LISTEN") == 0
    for state in ("SYN_SENT", "SYN_RECV", "FIN_WAIT1", "CLOSE_WAIT", "LAST_ACK"):
        assert metric(found, "tcptrace_sockets", state=state) == 0, state


def test_live_table_now_counts_sockets_made_since_start_when_older_ones_close():
    port = free_port()
    with listener(port=port, backlog=2 * PAIRS) as srv:
        old = open_pairs(srv, port, PAIRS)
        run = Running("--port", str(port), "--interval", str(INTERVAL))
        new = churn_around(port, run, srv, old)
        time.sleep(3 * INTERVAL)
        code, out, err = run.stop(signal.SIGINT)
        close_pairs(new)
    assert code == 0, err
    last = frames(out)[-1]
    assert last["ESTABLISHED"][2] == str(2 * PAIRS), out
