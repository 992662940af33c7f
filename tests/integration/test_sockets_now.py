"""Sockets in each state now (tcptrace_sockets, the live table's NOW) while sockets that
existed before tracing started come and go: they are left out, exactly."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcptrace.sockets.stuck import OLD_RECHECK_S

from .cmd import Running
from .netutil import free_port, listener
from .test_live_table import frames
from .test_metrics_endpoint import metric, scrape

pytestmark = pytest.mark.usefixtures("bpf_ready")

PAIRS = 50  # connections before tracing, and as many after
INTERVAL = 0.3
BURST = Path(__file__).with_name("burst.py")
CLIENTS = 4  # client processes of the churn, each with one connection at a time
# the churn's own sockets in ESTABLISHED at any moment (both ends of each client's)
IN_FLIGHT = 2 * CLIENTS
EACH = 8000  # connections each: a few seconds of churn


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


def established(*ports: int) -> int:
    """ESTABLISHED sockets with one of the ports at either end, as ss counts them (a
    dump filtered in the kernel: /proc/net/tcp's walk of a table full of churned
    timewait sockets is slow enough to count a socket twice)."""
    where = " or ".join(f"sport = :{p} or dport = :{p}" for p in ports)
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"( {where} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(out.splitlines())


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
        # --quiet: no events tell that the old ones moved; sock_diag checks them each
        # OLD_RECHECK_S (with events, their transitions take them off at once)
        time.sleep(OLD_RECHECK_S + 0.5)
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


@pytest.mark.host_only  # user space alone; Debian 12's guest has the host's userland
def test_gauge_follows_the_socket_table_under_churn():
    """ab -c 20 once made the gauge say 2,064 ESTABLISHED where ss showed 11 (entries
    minus exits counted from maps that change while read). Now the map's walk, in the
    kernel or in user space where the kernel refuses iterators, counts them."""
    churn_port, held_port, mport = free_port(), free_port(), free_port()
    run = Running("--port", f"{churn_port},{held_port}", "-q", "--metrics", str(mport))
    run.wait_ready()
    with listener(port=held_port, backlog=PAIRS) as srv:
        held = open_pairs(srv, held_port, PAIRS)
        time.sleep(1.5)  # a walk since the held connections opened
        burst = subprocess.Popen(
            [sys.executable, str(BURST), str(churn_port), str(CLIENTS), str(EACH)],
            stdout=subprocess.PIPE,
            text=True,
        )
        samples = []
        time.sleep(0.3)
        while burst.poll() is None and len(samples) < 8:
            gauge = metric(scrape(mport), "tcptrace_sockets", state="ESTABLISHED")
            samples.append((gauge, established(churn_port, held_port)))
            time.sleep(0.3)
        served = int(burst.communicate(timeout=300)[0])
        time.sleep(1.5)  # the walk is at most a second old
        settled = metric(scrape(mport), "tcptrace_sockets", state="ESTABLISHED")
        close_pairs(held)
    run.stop(signal.SIGINT)
    assert served == CLIENTS * EACH and len(samples) >= 2, (served, samples)
    for gauge, table in samples:
        # a second of churn between the walk and the table: its few in-flight sockets
        assert abs(gauge - table) <= 2 * IN_FLIGHT, samples
    assert settled == 2 * PAIRS, samples
