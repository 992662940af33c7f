"""--metrics: scrape the real exporter over loopback and check it against real connections."""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .cmd import Running
from .netutil import free_port, listener

pytestmark = pytest.mark.usefixtures("bpf_ready")

HELD = 2
HOLD = 0.3


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def metric(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def listening_on(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on a port."""
    found = []
    with open("/proc/net/tcp") as table:
        lines = table.read().splitlines()[1:]
    for line in lines:
        local, state = line.split()[1], line.split()[3]
        addr, hexport = local.split(":")
        if int(hexport, 16) == port and state == "0A":
            found.append(addr)
    return found


def test_exporter_counts_real_connections():
    traffic, mport = free_port(), free_port()
    run = Running("--port", str(traffic), "--quiet", "--metrics", str(mport))
    run.wait_ready()
    assert listening_on(mport) == ["0100007F"]  # 127.0.0.1 unless an address is given
    before = scrape(mport)
    assert metric(before, "tcptrace_events_traced_total") == 0

    with listener(port=traffic) as srv:
        pairs = []
        for _ in range(HELD):
            cli = socket.create_connection(("127.0.0.1", traffic))
            pairs.append((cli, srv.accept()[0]))
        time.sleep(0.1)
        during = scrape(mport)
        time.sleep(HOLD)
        for cli, conn in pairs:
            cli.close()
            time.sleep(0.02)
            conn.close()
        time.sleep(0.2)
    time.sleep(0.2)
    after = scrape(mport)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err

    # while held: both ends of each connection established, one listener
    assert metric(during, "tcptrace_sockets", state="ESTABLISHED") == 2 * HELD
    assert metric(during, "tcptrace_sockets", state="LISTEN") == 1
    assert metric(during, "tcptrace_sockets", state="SYN_SENT") == 0
    assert metric(during, "tcptrace_transitions_total", old="CLOSE", new="SYN_SENT") == HELD

    # all closed: nothing left anywhere, every transition counted once
    for state in ("ESTABLISHED", "LISTEN", "CLOSE_WAIT", "FIN_WAIT2", "LAST_ACK"):
        assert metric(after, "tcptrace_sockets", state=state) == 0, state
    for old, new in [
        ("CLOSE", "SYN_SENT"),
        ("SYN_SENT", "ESTABLISHED"),
        ("LISTEN", "SYN_RECV"),
        ("SYN_RECV", "ESTABLISHED"),
        ("ESTABLISHED", "FIN_WAIT1"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("CLOSE_WAIT", "LAST_ACK"),
        ("LAST_ACK", "CLOSE"),
    ]:
        assert metric(after, "tcptrace_transitions_total", old=old, new=new) == HELD, (old, new)
    # the clients' ends: a client's FIN_WAIT1 -> FIN_WAIT2 -> CLOSE (TIME_WAIT) may go
    # unseen by any BPF program, both hits together (kernel-side, rare: see
    # test_timewait's KERNEL_UNREPORTED); once so in CI. Anything else is exact.
    counted = {k: v for k, v in after.items() if k[0] == "tcptrace_transitions_total"}
    entered = metric(after, "tcptrace_transitions_total", old="FIN_WAIT1", new="FIN_WAIT2")
    left = sum(
        metric(after, "tcptrace_transitions_total", old="FIN_WAIT2", new=new)
        for new in ("TIME_WAIT", "CLOSE")
    )
    unseen = HELD - int(entered)
    assert unseen <= 1 and left == entered, (counted, out)
    assert metric(after, "tcptrace_events_traced_total") == 10 * HELD + 2 - 2 * unseen, (
        counted,
        out,
    )
    assert metric(after, "tcptrace_events_lost_total") == 0

    # ESTABLISHED lasted at least HOLD for all 2*HELD sockets: none below 2**28 ns (0.27 s)
    name = "tcptrace_state_duration_seconds"
    assert metric(after, f"{name}_count", state="ESTABLISHED") == 2 * HELD
    assert metric(after, f"{name}_bucket", state="ESTABLISHED", le=repr(2**28 / 1e9)) == 0
    assert metric(after, f"{name}_bucket", state="ESTABLISHED", le="+Inf") == 2 * HELD
    assert metric(after, f"{name}_sum", state="ESTABLISHED") >= 2 * HELD * HOLD
    assert 0 < metric(after, f"{name}_sum", state="SYN_SENT") < 1

    # --quiet: an exporter, no event lines; the summary agrees with the scrape
    assert out.splitlines()[0].startswith("STATE")
    assert out.splitlines()[-1] == f"{10 * HELD + 2 - 2 * unseen} transitions traced, 0 lost"


@pytest.mark.host_only  # user space alone; Debian 12's guest has the host's userland
def test_metrics_on_ipv6_loopback_beside_event_lines():
    traffic, mport = free_port(), free_port(socket.AF_INET6)
    run = Running("--port", str(traffic), "--metrics", f"[::1]:{mport}", "-n")
    run.wait_ready()
    with listener(port=traffic):
        time.sleep(0.2)
        with urllib.request.urlopen(f"http://[::1]:{mport}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    assert 'tcptrace_sockets{state="LISTEN"} 1.0' in text
    code, out, _ = run.stop()
    assert code == 0
    assert "CLOSE -> LISTEN" in out


@pytest.mark.host_only  # user space alone; Debian 12's guest has the host's userland
def test_metrics_port_in_use_is_one_line_exit_1():
    with listener() as busy:
        port = busy.getsockname()[1]
        run = Running("--port", str(free_port()), "--metrics", str(port))
        code, _out, err = run.wait()
    assert code == 1
    in_use = os.strerror(errno.EADDRINUSE)
    assert err.strip() == f"tcptrace: cannot serve metrics on 127.0.0.1:{port}: {in_use}"


def summary_transitions(text: str) -> dict[tuple[str, str], int]:
    """(old, new) -> count from the --json summary object."""
    import json

    summary = json.loads(text.splitlines()[-1])
    return {(t["old"], t["new"]): t["count"] for t in summary["transitions"]}


def test_metrics_count_time_wait_as_the_summary_does():
    traffic, mport = free_port(), free_port()
    run = Running("--port", str(traffic), "--json", "--metrics", str(mport))
    run.wait_ready()
    with listener(port=traffic) as srv:
        for _ in range(HELD):
            cli = socket.create_connection(("127.0.0.1", traffic))
            conn, _ = srv.accept()
            cli.close()  # the client's active close: its end goes to TIME_WAIT
            time.sleep(0.02)
            conn.close()
        time.sleep(0.5)
        found = scrape(mport)
    time.sleep(0.2)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    summary = summary_transitions(out)
    assert summary[("FIN_WAIT2", "TIME_WAIT")] == HELD, summary
    for (old, new), n in summary.items():
        if (old, new) != ("LISTEN", "CLOSE"):  # the listener closed after the scrape
            assert metric(found, "tcptrace_transitions_total", old=old, new=new) == n, (old, new)
    assert metric(found, "tcptrace_transitions_total", old="FIN_WAIT2", new="CLOSE") == 0
    assert metric(found, "tcptrace_sockets", state="TIME_WAIT") == HELD
    assert metric(found, "tcptrace_sockets", state="FIN_WAIT2") == 0
