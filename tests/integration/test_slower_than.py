"""--slower-than on real connections: the kernel submits only transitions that left a
state after at least its threshold; the summary still counts every transition."""

from __future__ import annotations

import csv
import ctypes
import io
import json
import signal
import socket
import time

import pytest

from tcptrace.filters import ALL_STATES, Filters
from tcptrace.kernel.events import C_FAST, C_SEEN, C_SIDE, C_SUBMITTED, F_ACCEPTED
from tcptrace.states import TcpState as S

from .cmd import Running
from .netutil import free_port, listener
from .test_owners import parse_duration, transitions

pytestmark = pytest.mark.usefixtures("bpf_ready")

NS_PER_S = 1_000_000_000
# One connect and close on loopback, both ends, plus the listener.
ALL_TRANSITIONS = 12
# Of them, those that left a state after hold(established=1.5): the two ends'
# ESTABLISHED and the listener's LISTEN (it lived through it all).
# The summary's LEFT column for it: every exit, shown or not.
ALL_LEFT = {"LISTEN": 1, "SYN_SENT": 1, "SYN_RECV": 1, "ESTABLISHED": 2}
ALL_LEFT |= {"FIN_WAIT1": 1, "FIN_WAIT2": 1, "CLOSE_WAIT": 1, "LAST_ACK": 1}
SLOW_EXITS = [("ESTABLISHED", "CLOSE_WAIT"), ("ESTABLISHED", "FIN_WAIT1"), ("LISTEN", "CLOSE")]


def hold(port: int, established: float, close_wait: float = 0.02) -> None:
    """A connection held ESTABLISHED, then closed by the client; the server holds
    CLOSE_WAIT before closing. The listener lives through all of it."""
    with listener(port=port) as srv:
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        time.sleep(established)
        cli.close()  # client ESTABLISHED -> FIN_WAIT1 ...; server ESTABLISHED -> CLOSE_WAIT
        time.sleep(close_wait)
        conn.close()  # server CLOSE_WAIT -> LAST_ACK -> CLOSE


def start(port: int, *args: str) -> Running:
    return Running("--port", str(port), *args)


def moves(out: str) -> list[tuple[str, str]]:
    return sorted((r[4], r[5]) for r in transitions(out))


def left(out: str) -> dict[str, int]:
    """The summary table's LEFT column, per state."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in S.__members__ and len(parts) == 8:
            rows[parts[0]] = int(parts[1])
    return rows


def test_only_the_slow_exits_are_shown_and_every_transition_is_counted():
    port = free_port()
    text = start(port, "-n", "-T", "none", "--slower-than", "1s")
    as_json = start(port, "--json", "--slower-than", "1s")
    # both filters apply: the listener's exits only, and only the slow ones
    as_csv = start(port, "--csv", "--state", "LISTEN", "--slower-than", "1s")
    for run in (text, as_json, as_csv):
        run.wait_ready()
    hold(port, established=1.5)
    time.sleep(0.3)
    code, out, err = text.stop(signal.SIGINT)
    assert code == 0, err
    # not the handshake, nor the closing steps, nor the births
    assert moves(out) == SLOW_EXITS, out
    assert all(parse_duration(r[6]) >= 1.0 for r in transitions(out)), out
    # the summary counts every transition, shown or not
    assert left(out) == ALL_LEFT, out
    # traced = shown + faster + lost
    assert out.splitlines()[-1] == (
        f"{ALL_TRANSITIONS} transitions traced, 3 shown (slower than 1s), 9 faster, 0 lost"
    )

    code, out, err = as_json.stop(signal.SIGINT)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    shown, summary = records[:-1], records[-1]
    assert sorted((r["old"], r["new"]) for r in shown) == SLOW_EXITS
    assert all(r["duration_ns"] >= NS_PER_S for r in shown)
    assert summary["transitions_traced"] == ALL_TRANSITIONS
    assert (summary["written"], summary["faster"], summary["lost"]) == (3, 9, 0)
    assert sum(t["count"] for t in summary["transitions"]) == ALL_TRANSITIONS

    code, out, err = as_csv.stop(signal.SIGINT)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["old"], r["new"]) for r in rows] == [("LISTEN", "CLOSE")]
    # CLOSE -> LISTEN and the child's LISTEN -> SYN_RECV passed the state filter, but
    # are births: no time in a state to judge
    assert err.splitlines()[-1] == (
        f"{ALL_TRANSITIONS} transitions traced, 1 shown (slower than 1s), 2 faster, 0 lost"
    )


def test_per_state_thresholds_pick_the_states():
    port = free_port()
    established = start(port, "-n", "-T", "none", "--slower-than", "ESTABLISHED=1s")
    # a default for the states not named, one state given in a second option
    both = start(
        port,
        "-n",
        "-T",
        "none",
        "--slower-than",
        "10s,ESTABLISHED=1s",
        "--slower-than",
        "CLOSE_WAIT=1s",
    )
    # a later bare duration overrides the earlier one
    overridden = start(port, "-n", "-T", "none", "--slower-than", "1m", "--slower-than", "2s")
    for run in (established, both, overridden):
        run.wait_ready()
    hold(port, established=1.2, close_wait=1.2)  # the listener lives 2.4 s
    time.sleep(0.3)
    results = [run.stop(signal.SIGINT) for run in (established, both, overridden)]
    for code, _out, err in results:
        assert code == 0, err
    out = results[0][1]
    # CLOSE_WAIT (1.2 s) and LISTEN (2.4 s) have no threshold: not shown
    assert moves(out) == [("ESTABLISHED", "CLOSE_WAIT"), ("ESTABLISHED", "FIN_WAIT1")], out
    assert out.splitlines()[-1] == (
        f"{ALL_TRANSITIONS} transitions traced, 2 shown (slower than ESTABLISHED=1s), "
        "10 faster, 0 lost"
    )
    out = results[1][1]
    assert moves(out) == [
        ("CLOSE_WAIT", "LAST_ACK"),
        ("ESTABLISHED", "CLOSE_WAIT"),
        ("ESTABLISHED", "FIN_WAIT1"),
    ], out
    assert "3 shown (slower than 10s,ESTABLISHED=1s,CLOSE_WAIT=1s), 9 faster" in out
    out = results[2][1]
    assert moves(out) == [("LISTEN", "CLOSE")], out
    assert "1 shown (slower than 2s), 11 faster" in out


def test_time_wait_entry_is_judged_by_the_time_in_fin_wait2():
    """FIN_WAIT2 -> TIME_WAIT shows when FIN_WAIT2 itself was slow (the kernel reports
    it as FIN_WAIT2 -> CLOSE; user space relabels it)."""
    port = free_port()
    fin_wait2 = start(port, "-n", "-T", "none", "--slower-than", "FIN_WAIT2=1s")
    time_wait = start(port, "-n", "-T", "none", "--state", "TIME_WAIT", "--slower-than", "1s")
    for run in (fin_wait2, time_wait):
        run.wait_ready()
    with listener(port=port) as srv:
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        cli.shutdown(socket.SHUT_WR)  # FIN_WAIT1 -> FIN_WAIT2, the socket still open
        time.sleep(1.2)
        conn.close()  # the peer's FIN: FIN_WAIT2 -> TIME_WAIT after 1.2 s
        time.sleep(0.1)
        cli.close()
    time.sleep(0.5)
    for run in (fin_wait2, time_wait):
        code, out, err = run.stop(signal.SIGINT)
        assert code == 0, err
        rows = transitions(out)
        assert [(r[4], r[5]) for r in rows] == [("FIN_WAIT2", "TIME_WAIT")], out
        assert parse_duration(rows[0][6]) >= 1.0
        assert "1 shown (slower than " in out.splitlines()[-1], out


def test_births_and_untimed_exits_are_never_slow():
    """With the smallest threshold every timed exit is shown; a socket's first
    transition has no time in a state, one seen mid-life no known time."""
    from tcptrace.kernel.loader import Probe, ProbeConfig

    port = free_port()
    with listener(port=port) as srv:
        old_cli = socket.create_connection(("127.0.0.1", port))
        old_conn, _ = srv.accept()
        filters = Filters(ports=frozenset({port}), slower_than=((ALL_STATES, 1),))
        probe = Probe(ProbeConfig(filters=filters, buffer_pages=64))
        try:
            slow_ns = probe.bpf[b"slow_ns"]
            # every state that can be left after a known time; CLOSE and TIME_WAIT never
            for state in S:
                want = 0 if state in (S.CLOSE, S.TIME_WAIT, S.NEW_SYN_RECV) else 1
                assert slow_ns[ctypes.c_int(int(state))].value == want, state
            new_cli = socket.create_connection(("127.0.0.1", port))
            new_conn, _ = srv.accept()
            for sock in (old_cli, new_cli, old_conn, new_conn):
                sock.close()
            time.sleep(0.2)
        finally:
            srv.close()
            time.sleep(0.1)
            probe.detach()
        events = []
        while batch := probe.poll_events(0):
            events += batch
        summary = probe.summary()
        probe.close()
    # (accept() gave the child of a listener older than tracing an owner: a record of
    # its own, not a transition, counted apart)
    accepts = [ev for ev in events if ev.flags & F_ACCEPTED]
    events = [ev for ev in events if not ev.flags & F_ACCEPTED]
    assert len(accepts) == summary.counters[C_SIDE]
    assert events, "no timed transition was shown"
    assert all(ev.delta_known for ev in events)
    assert not any(ev.oldstate == S.CLOSE for ev in events)
    assert not any((ev.oldstate, ev.newstate) == (S.LISTEN, S.SYN_RECV) for ev in events)
    counters = summary.counters
    # 2 births (the new connect and its child: the listener is older than tracing),
    # and 3 untimed exits: the old pair's ESTABLISHED and the old listener's LISTEN
    assert counters[C_FAST] == 2 + 3
    assert counters[C_SEEN] == counters[C_SUBMITTED] + counters[C_FAST]
    assert len(events) == counters[C_SUBMITTED]
