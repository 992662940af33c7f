"""TIME_WAIT made visible on real active closes: relabelled, followed, timed, summarised."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from .cmd import Lines, Running
from .netutil import clients_close_first, free_port, half_close_first, listener
from .test_owners import parse_duration, transitions

pytestmark = pytest.mark.usefixtures("bpf_ready")

IN_VM = os.environ.get("TCPTRACE_IN_VM") == "1"  # the emulated guests: slower


def bound_client(port: int, client_port: int) -> socket.socket:
    cli = socket.socket()
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    cli.bind(("127.0.0.1", client_port))
    cli.connect(("127.0.0.1", port))
    return cli


def server_closes_first(
    srv: socket.socket, port: int, client_port: int, peer_after: float = 0.05
) -> None:
    """The server makes the active close: its side of the 4-tuple goes to TIME_WAIT."""
    cli = bound_client(port, client_port)
    conn, _ = srv.accept()
    conn.close()
    time.sleep(peer_after)
    cli.close()


def test_time_wait_ended_by_a_new_connection_on_the_same_4_tuple():
    """Linux lets a new SYN for the same 4-tuple end a TIME_WAIT early: a real end, fast."""
    port, client_port = free_port(), free_port()
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    gap = 1.5
    with listener(port=port) as srv:
        server_closes_first(srv, port, client_port)
        time.sleep(gap)
        server_closes_first(srv, port, client_port)  # its SYN ends the first TIME_WAIT
        time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    server_side = [
        r for r in transitions(out) if r[2] == f"127.0.0.1:{port}" and r[3] != "0.0.0.0:*"
    ]
    moves = [(r[4], r[5]) for r in server_side]
    assert moves.count(("FIN_WAIT2", "TIME_WAIT")) == 2, out
    assert ("FIN_WAIT2", "CLOSE") not in moves, out
    ended = [r for r in server_side if (r[4], r[5]) == ("TIME_WAIT", "CLOSE")]
    assert len(ended) == 1, out
    # in TIME_WAIT from the first close until the second connection's SYN; the entry
    # time comes from the socket's timer, exact to a couple of jiffies (4 ms at HZ=250)
    assert gap - 0.01 <= parse_duration(ended[0][6]) < gap + 1.0, out
    # the summary counts TIME_WAIT like any other state
    row = next(line for line in out.splitlines() if line.startswith("TIME_WAIT"))
    assert row.split()[1] == "1"


# The client enters TIME_WAIT between the server's FIN and the server's receipt of the
# ACK the client sends just before (on loopback the ACK waits for the softirq in hand,
# or, sent from process context, may be taken at once: microseconds, hence the slack).
ACK_BEFORE_TIME_WAIT_SLACK_NS = 500_000
ENDS_ASKED_FOR = 8  # timewait.VERIFY_AGREED: ends looked up before the kernel's word is trusted


def test_time_wait_entered_at_the_kernels_end_is_stamped_then_not_a_jiffy_later():
    """A client that closes first enters TIME_WAIT as the server's FIN comes, which is
    the kernel's own FIN_WAIT2 -> CLOSE. Its timer, read through sock_diag, says so to a
    jiffy only: the line once went out up to a jiffy late (2.85 ms in FIN_WAIT2, not
    µs), printed before older lines read after it (CI: 515 of 12,002 out of order)."""
    port = free_port()
    run = Running("--port", str(port), "--json")
    run.wait_ready()
    with listener(port=port) as srv:
        for _ in range(ENDS_ASKED_FOR):
            cli = socket.create_connection(("127.0.0.1", port))
            conn, _ = srv.accept()
            cli.shutdown(socket.SHUT_WR)
            assert conn.recv(1) == b""
            conn.close()  # the server's FIN: the client's TIME_WAIT begins
            cli.close()
            time.sleep(0.05)
        time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    moves = [
        r for r in map(json.loads, filter(None, out.splitlines())) if r["type"] == "transition"
    ]
    server = {
        (r["remote_port"], r["old"]): r["ts_ns"]
        for r in moves
        if r["local_port"] == port and r["old"] in ("CLOSE_WAIT", "LAST_ACK")
    }
    entered = [
        r
        for r in moves
        if (r["old"], r["new"]) == ("FIN_WAIT2", "TIME_WAIT") and r["remote_port"] == port
    ]
    assert len(entered) == ENDS_ASKED_FOR, out
    wrong = []
    for r in entered:
        fin, acked = server[(r["local_port"], "CLOSE_WAIT")], server[(r["local_port"], "LAST_ACK")]
        if not fin <= r["ts_ns"] <= acked + ACK_BEFORE_TIME_WAIT_SLACK_NS:
            wrong.append((r["ts_ns"] - fin, acked - fin, r["note"]))
    assert not wrong, f"TIME_WAIT entries (ns after the server's FIN, its ACK, note): {wrong}"


PEER_CLOSES_AFTER_S = 0.04


def test_time_wait_begins_at_the_peers_fin_even_when_read_after_it():
    """The kernel reports the orphan's FIN_WAIT2 -> CLOSE when a timewait socket takes
    its place, still in FIN_WAIT2; TIME_WAIT begins with the peer's FIN. The tracer is
    stopped (a reader far behind) until after that FIN: the line must still say when."""
    port, client_port = free_port(), free_port()
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    with listener(port=port) as srv:
        cli = bound_client(port, client_port)
        conn, _ = srv.accept()
        time.sleep(0.2)  # the handshake read: only the close is behind
        os.kill(run.proc.pid, signal.SIGSTOP)
        try:
            cli.close()  # the client closes first: FIN_WAIT1, FIN_WAIT2
            time.sleep(PEER_CLOSES_AFTER_S)
            conn.close()  # the peer's FIN: the client's timewait socket enters TIME_WAIT
            time.sleep(0.1)
        finally:
            os.kill(run.proc.pid, signal.SIGCONT)
        time.sleep(0.5)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    client = [r for r in transitions(out) if r[2] == f"127.0.0.1:{client_port}"]
    spent = {r[4]: parse_duration(r[6]) for r in client if r[6] != "-"}
    assert [(r[4], r[5]) for r in client][-2:] == [
        ("FIN_WAIT1", "FIN_WAIT2"),
        ("FIN_WAIT2", "TIME_WAIT"),
    ], out
    # from close() to the peer's FIN, to the timer's precision (a jiffy: 4 ms at HZ 250)
    closing = spent["FIN_WAIT1"] + spent["FIN_WAIT2"]
    assert PEER_CLOSES_AFTER_S - 0.01 <= closing < PEER_CLOSES_AFTER_S + 0.1, out


# connections a second: an ordinary rate, which once left most unfollowed; under the
# VM's emulation each look-up costs many times more of the look-up budget
RATE = 25 if IN_VM else 100
CONNECTIONS = 3 * RATE


def test_every_time_wait_is_followed_at_an_ordinary_rate():
    """A client closing first 100 times a second: each of its sockets goes to TIME_WAIT
    (ss holds 300), and each is shown so; once 231 of 300 were left FIN_WAIT2 -> CLOSE
    ("not followed"), every look-up a dump of the whole established table (~6 ms)."""
    port = free_port()
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    with listener(port=port, backlog=128) as srv:
        clients_close_first(srv, port, CONNECTIONS, rate=RATE, wait=10)
        time.sleep(0.5)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    moves = [(r[4], r[5]) for r in transitions(out) if r[3] == f"127.0.0.1:{port}"]
    assert moves.count(("FIN_WAIT2", "TIME_WAIT")) == CONNECTIONS, out[-2000:]
    assert ("FIN_WAIT2", "CLOSE") not in moves, out[-2000:]
    assert "not followed" not in out + err


# More sockets in TIME_WAIT at once than were ever followed (4,096 once): the
# kernel's 60 s keeps every one of a burst there together (fewer in the emulated VM)
BURST = 1000 if IN_VM else 6000
# Share of a burst's clients whose FIN_WAIT1 -> FIN_WAIT2 -> CLOSE no BPF program sees
# (below): up to 83 of 6,000 (1.4%) on a loaded 6.18 host
KERNEL_UNREPORTED = 0.02


def tcp_out_resets() -> int:
    """Resets this network namespace's TCP has sent (Tcp: OutRsts of /proc/net/snmp)."""
    with open("/proc/net/snmp") as snmp:
        names, values = [line.split() for line in snmp if line.startswith("Tcp:")]
    return int(values[names.index("OutRsts")])


def odd_fin_wait2_exits(out: str, port: int) -> str:
    """The lines leaving FIN_WAIT2 or CLOSING towards the port that are not a plain
    entry into TIME_WAIT, with every other line of their client port: what a failed
    count needs to be understood (the tail of 60,000 lines does not show it)."""
    odd = set()
    for line in out.splitlines():
        parts = line.split()
        if f"127.0.0.1:{port}" in parts and ("FIN_WAIT2" in parts or "CLOSING" in parts):
            plain = len(parts) == 8 and parts[5] == "->" and parts[6] == "TIME_WAIT"
            if not plain and parts[4] in ("FIN_WAIT2", "CLOSING"):
                odd.add(parts[2])
    lines = [line for line in out.splitlines() if any(f" {o} " in line for o in odd)]
    return "\n".join(lines[:200] + out.splitlines()[-14:])


def test_every_time_wait_of_a_burst_is_followed():
    """Thousands of clients closing first as fast as one process can: all are in
    TIME_WAIT together, and each is shown so. Once 4,096 followed was the cap, and
    each look-up charged a 5% budget: the rest were left FIN_WAIT2 -> CLOSE."""
    port = free_port()
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    # (a backlog the burst cannot overflow: no handshake retried a second later)
    resets_before = tcp_out_resets()
    with listener(port=port, backlog=BURST) as srv:
        clients_close_first(srv, port, BURST)
        time.sleep(1.0)
        resets = tcp_out_resets() - resets_before
        in_time_wait = subprocess.run(
            ["ss", "-Htan", "state", "time-wait", f"( dport = :{port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.count("\n")
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    moves = [(r[4], r[5]) for r in transitions(out) if r[3] == f"127.0.0.1:{port}"]
    # a client whose FIN and the server's cross goes through CLOSING instead
    entered = moves.count(("FIN_WAIT2", "TIME_WAIT")) + moves.count(("CLOSING", "TIME_WAIT"))
    # every exit the kernel reported from FIN_WAIT2 or CLOSING became a TIME_WAIT line
    rows = [line.split() for line in out.splitlines() if line[:1].isupper()]
    left = {row[0]: int(row[1]) for row in rows if row[1].isdigit()}  # the summary's
    reported = left.get("FIN_WAIT2", 0) + left.get("CLOSING", 0)
    # a reset (below) may kill a timewait socket before the peer's FIN: found gone by
    # a poll while still in FIN_WAIT2, it never entered TIME_WAIT and is told so
    # (once in CI, 1 of 6,000, with 13 TIME_WAITs killed the same way)
    killed = moves.count(("FIN_WAIT2", "CLOSE")) + moves.count(("CLOSING", "CLOSE"))
    assert entered + killed == reported, odd_fin_wait2_exits(out, port)
    assert killed <= tcp_out_resets() - resets_before, odd_fin_wait2_exits(out, port)
    # About 1 run in 20 here (more under load), 1 to 83 of 6,000 client sockets are
    # never seen entering or leaving FIN_WAIT2 (their peer's LAST_ACK -> CLOSE is),
    # with no recursion miss counted for either program. An independent raw-tracepoint
    # counter beside tcptrace saw exactly the same shortfall (5,924 and 5,953 of 6,000
    # under load): the tracepoint's hits never reach BPF. A kernel-side loss tcptrace
    # cannot follow, not understood yet (see the note).
    assert BURST * (1 - KERNEL_UNREPORTED) <= reported <= BURST, out[-2000:]
    # connect() may take a port whose 4-tuple waits (tcp_tw_reuse, on for loopback):
    # those TIME_WAITs end early, shown so. And the kernel kills some with a reset
    # (without tcptrace too: on a loaded host up to 272 of 6,000 were gone from ss a
    # second later, exactly as many as the resets sent); above POLL_ALL followed, a
    # socket in TIME_WAIT is not asked for and ends at its timer in tcptrace's view.
    # ss holds the rest.
    ended = moves.count(("TIME_WAIT", "CLOSE"))
    assert in_time_wait + ended + resets >= BURST, (in_time_wait, ended, resets)
    assert in_time_wait + ended <= BURST, (in_time_wait, ended)
    assert "not followed" not in out + err


def test_a_4_tuple_reused_before_the_reader_looked_says_its_end_is_unsure():
    """The reader is stopped while a client closes first and then, 1.5 s later, connects
    again on the same 4-tuple (ending its TIME_WAIT): by the time the reader asks, the
    timewait socket is gone, and nothing tells whether it was there. The kernel's
    FIN_WAIT2 -> CLOSE stands, marked, and counted in the summary."""
    port, client_port = free_port(), free_port()
    run = Running("--port", str(port), "--json")
    run.wait_ready()
    with listener(port=port) as srv:
        os.kill(run.proc.pid, signal.SIGSTOP)
        try:
            cli = bound_client(port, client_port)
            conn, _ = srv.accept()
            cli.close()  # FIN_WAIT1, FIN_WAIT2, then TIME_WAIT at the peer's FIN
            time.sleep(0.05)
            conn.close()
            time.sleep(1.5)
            again = bound_client(port, client_port)  # ends that TIME_WAIT
            conn, _ = srv.accept()
            again.close()
            conn.close()
            time.sleep(0.1)
        finally:
            os.kill(run.proc.pid, signal.SIGCONT)
        time.sleep(0.5)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    first_end = next(
        r
        for r in records
        if r["type"] == "transition" and r["local_port"] == client_port and r["old"] == "FIN_WAIT2"
    )
    assert (first_end["new"], first_end["note"]) == ("CLOSE", "time_wait_not_followed"), out
    (summary,) = [r for r in records if r["type"] == "summary"]
    assert summary["time_wait_not_followed"] >= 1, summary


def test_state_filter_time_wait_shows_only_time_wait():
    port, client_port = free_port(), free_port()
    run = Running("--port", str(port), "-n", "-T", "none", "--state", "TIME_WAIT")
    run.wait_ready()
    with listener(port=port) as srv:
        server_closes_first(srv, port, client_port)
        time.sleep(0.2)
        server_closes_first(srv, port, client_port)
        time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    moves = [(r[4], r[5]) for r in transitions(out)]
    assert moves == [
        ("FIN_WAIT2", "TIME_WAIT"),
        ("TIME_WAIT", "CLOSE"),
        ("FIN_WAIT2", "TIME_WAIT"),
    ], out


def test_lifetime_lines_include_time_wait():
    port, client_port = free_port(), free_port()
    run = Running("--port", str(port), "-n", "-T", "none", "--lifetime")
    run.wait_ready()
    with listener(port=port) as srv:
        server_closes_first(srv, port, client_port)
        time.sleep(0.5)
        server_closes_first(srv, port, client_port)
        time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    lines = [line.split() for line in out.splitlines()[1:] if "ESTABLISHED" in line]
    # two client connections (passive close) and the server's first one (ended by the reuse)
    clients = [p for p in lines if p[2] == f"127.0.0.1:{client_port}"]
    servers = [p for p in lines if p[2] == f"127.0.0.1:{port}"]
    assert len(clients) == 2 and len(servers) == 1, out
    assert clients[0][5::2] == ["SYN_SENT", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK"], out
    names = servers[0][5::2]
    assert names == ["SYN_RECV", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT"], out
    total = parse_duration(servers[0][4])
    assert sum(parse_duration(d) for d in servers[0][6::2]) == pytest.approx(total, rel=0.01)
    assert total >= 0.5


def test_lifetime_json_records():
    port, client_port = free_port(), free_port()
    run = Running("--port", str(port), "-n", "--lifetime", "--json")
    run.wait_ready()
    with listener(port=port) as srv:
        server_closes_first(srv, port, client_port)
        time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["type"] for r in records] == ["lifetime", "summary"], out
    life = records[0]
    # the client's connection (passive close): its socket is gone, no TIME_WAIT to wait for
    assert (life["local_port"], life["remote_port"]) == (client_port, port)
    assert life["family"] == "ipv4" and life["complete"] is True
    assert [s["state"] for s in life["states"]] == [
        "SYN_SENT",
        "ESTABLISHED",
        "CLOSE_WAIT",
        "LAST_ACK",
    ]
    assert sum(s["duration_ns"] for s in life["states"]) == life["duration_ns"]
    assert life["end_ns"] - life["start_ns"] == life["duration_ns"]
    assert life["start"].endswith("Z") and life["pid"] == os.getpid()


def test_lifetime_json_keeps_the_whole_connection_through_time_wait():
    """The same as the text lines: the first server connection, from SYN_RECV to the end
    of its TIME_WAIT (its kernel record came in a batch whose event was held back)."""
    port, client_port = free_port(), free_port()
    run = Running("--port", str(port), "-n", "--lifetime", "--json")
    run.wait_ready()
    with listener(port=port) as srv:
        # the peer closes well after the reader saw the server's socket go: its timewait
        # socket waits in FIN_WAIT2, and the kernel's record with it
        server_closes_first(srv, port, client_port, peer_after=0.3)
        time.sleep(0.5)
        server_closes_first(srv, port, client_port)
        time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    servers = [r for r in records if r["type"] == "lifetime" and r["local_port"] == port]
    assert len(servers) == 1, out
    (life,) = servers
    assert [s["state"] for s in life["states"]] == [
        "SYN_RECV",
        "ESTABLISHED",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
    ], out
    assert life["complete"] is True, out
    assert sum(s["duration_ns"] for s in life["states"]) == life["duration_ns"], out
    assert life["duration_ns"] >= 0.5e9, out


@pytest.fixture
def no_timewait_namespace():
    """A fresh network namespace whose timewait table holds nothing
    (net.ipv4.tcp_max_tw_buckets=0): closing sockets skip TIME_WAIT there."""
    from pyroute2 import IPRoute, netns

    name = f"tcptrace-test-{os.getpid()}"
    netns.create(name)
    netns.pushns(name)
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        with open("/proc/sys/net/ipv4/tcp_max_tw_buckets", "w") as f:
            f.write("0")
        yield name
    finally:
        netns.popns()
        netns.remove(name)


def test_without_a_timewait_socket_the_kernels_event_stays(no_timewait_namespace):
    port = free_port()
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    with listener(port=port) as srv:
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        conn.close()
        time.sleep(0.05)
        cli.close()
        time.sleep(0.3)
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    moves = [(r[4], r[5]) for r in transitions(out)]
    assert ("FIN_WAIT2", "CLOSE") in moves, out
    assert not any("TIME_WAIT" in m for m in moves), out


def test_the_socket_table_knows_where_no_timewait_socket_is_made(no_timewait_namespace):
    from tcptrace.sockets.sockdiag import SocketTable

    # each table reads its own namespace's tcp_max_tw_buckets, wherever it is asked
    # from (the parent process stayed in the namespace the test began in)
    home = f"/proc/{os.getppid()}/ns/net"
    with SocketTable() as here, SocketTable(home) as there:
        assert not here.makes_timewait()
        assert there.makes_timewait()


# The peer closes this long after the client: the client's real FIN_WAIT2 time.
PEER_LAG = 0.1


def summary_rows(out: str) -> dict[str, tuple[int, float]]:
    """The exit summary's table: state -> (LEFT, MEAN in seconds)."""
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("STATE "))
    rows = {}
    for line in lines[start + 1 :]:
        fields = line.split()
        if len(fields) < 3 or not fields[1].isdigit():
            break
        rows[fields[0]] = (int(fields[1]), parse_duration(fields[2]))
    return rows


# In the emulated VM --quiet's FIN_WAIT2 mean once came out 19.5 ms against 93 ms with
# lines: its first sock_diag table opened at the first end (1.7 s there) and spent the
# look-up budget, 4 of 5 ends unfollowed. Tables are opened at start now.
def test_summaries_without_lines_follow_time_wait_as_lines_do():
    """--quiet and the live table print no transitions; their summary is the lines' one
    all the same: an orphan's FIN_WAIT2 lasts until its peer's FIN (PEER_LAG), not the
    few µs until the kernel swapped it for a timewait socket (issue 21.7)."""
    port = free_port()
    # (--stuck alone prints its reports only: its summary once took an orphan's
    # FIN_WAIT2 to end as the kernel swapped it for a timewait socket, ~10 µs)
    modes = [
        ("-n",),
        ("-q",),
        ("-i", "1"),
        ("-q", "--metrics", str(free_port())),
        ("--stuck", "CLOSE_WAIT=60s", "-n"),
    ]
    if IN_VM:
        # the lines and --quiet: the others differ from --quiet in user space only,
        # and five tracers at once cost the emulated guest ~45 s (CI's budget)
        modes = modes[:2]
    runs = [Running("--port", str(port), *mode) for mode in modes]
    for run in runs:
        run.wait_ready()
    with listener(port=port) as srv:
        for _ in range(CONNECTIONS_SLOW):
            client = socket.create_connection(("127.0.0.1", port))
            server, _ = srv.accept()
            client.close()
            time.sleep(PEER_LAG)
            server.close()
        time.sleep(0.5)
    summaries = []
    for run in runs:
        code, out, err = run.stop(signal.SIGINT)
        assert code == 0, err
        summaries.append(summary_rows(out))
    lines_mode = summaries[0]
    left, mean = lines_mode["FIN_WAIT2"]
    assert left == CONNECTIONS_SLOW and PEER_LAG * 0.9 <= mean <= PEER_LAG * 2, lines_mode
    for mode, rows in zip(modes[1:], summaries[1:]):
        assert rows.keys() == lines_mode.keys(), (mode, rows)
        assert rows["FIN_WAIT2"][0] == left, (mode, rows)
        # (each mode stamps the peer's FIN from its own poll of the timer: a jiffy apart)
        assert abs(rows["FIN_WAIT2"][1] - mean) <= 0.01, (mode, rows, lines_mode)


CONNECTIONS_SLOW = 5


# TCP_TIMEWAIT_LEN: a TIME_WAIT's timer, which no test waits for.
TIME_WAIT_LEN_S = 60


# How long after the kills the test waits at most for their ends (the timer: 60 s).
KILLED_TOLD_WITHIN_S = 30


@pytest.mark.host_only  # the rotation is user space's (sock_diag's bands: test_sockdiag)
def test_beyond_poll_all_a_time_wait_killed_early_is_seen_go_within_a_round():
    """More than POLL_ALL followed: those in TIME_WAIT are asked for a band at a time,
    so one the kernel kills early (a reset; here ss -K) is told gone within a round,
    not at its 60 s timer. Before, nothing was said until then."""
    from tcptrace.sockets.timewait import POLL_ALL, ROTATION

    count = POLL_ALL + 600
    port = free_port()
    run = Running("--port", str(port), "-n", "-T", "none")
    run.wait_ready()
    drain = Lines(run.proc.stdout)  # read as it comes: a blocked writer would not poll
    with listener(port=port, backlog=count) as srv:
        half_close_first(srv, port, count)
        time.sleep(1.0)
        rows = subprocess.run(
            ["ss", "-Htan", "state", "time-wait", f"( dport = :{port} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        victims = sorted(int(row.split()[-2].rsplit(":", 1)[1]) for row in rows)[::250]
        for victim in victims:
            subprocess.run(
                ["ss", "-K", "-Htan", "state", "time-wait", f"( sport = :{victim} )"],
                capture_output=True,
                check=True,
            )
        # two rounds of polls, one a second (the first may have begun before the
        # burst's last sockets were followed), and more; under emulation polls are
        # fewer (each dump is slow, and the look-up budget 5% of the time): until
        # every victim's end is told, or KILLED_TOLD_WITHIN_S, well before the timer
        time.sleep(2 * -(-count // ROTATION) + 2)
        waiting = {f"127.0.0.1:{victim}" for victim in victims}
        deadline, seen = time.monotonic() + KILLED_TOLD_WITHIN_S, 0
        while waiting and time.monotonic() < deadline:
            time.sleep(1)
            new, seen = drain.lines[seen:], len(drain.lines)
            for line in new:
                if "TIME_WAIT -> CLOSE" in line:
                    waiting.discard(line.split()[2])
    run.proc.send_signal(signal.SIGINT)
    code = run.proc.wait(timeout=60)
    drain.join(10)
    out, err = "\n".join(drain.lines), run.stderr_head + run.proc.stderr.read()
    assert code == 0, err
    mine = [r for r in transitions(out) if r[3] == f"127.0.0.1:{port}"]
    ends = {
        int(r[2].rsplit(":", 1)[1]): parse_duration(r[6])
        for r in mine
        if (r[4], r[5]) == ("TIME_WAIT", "CLOSE")
    }
    # (ss may also list an earlier run's TIME_WAITs on this port: not this burst's)
    entered = {int(r[2].rsplit(":", 1)[1]) for r in mine if r[5] == "TIME_WAIT"}
    victims = [victim for victim in victims if victim in entered]
    assert len(victims) >= 15, (len(entered), len(mine), out[-1500:])
    for victim in victims:
        # told gone before tcptrace stopped: the timer (60 s) had not run
        assert victim in ends, (victim, sorted(ends))
        assert ends[victim] < TIME_WAIT_LEN_S, (victim, ends[victim])


SIXTY_SECONDS_TEST = "test_time_wait_lasts_the_kernels_60_seconds"
# ss asks from this long after the entry, every SS_EVERY_S, until this long after it
SS_FROM_S, SS_UNTIL_S, SS_EVERY_S = 59.5, 65.0, 0.02


class NaturalEnd:
    """A client socket in TIME_WAIT from the module's start, and when ss saw it go."""

    def __init__(self) -> None:
        self.port = free_port()
        self.run = Running("--port", str(self.port), "--json")  # durations to the ns
        self.run.wait_ready()
        with listener(port=self.port) as srv:
            cli = socket.create_connection(("127.0.0.1", self.port))
            client_port = cli.getsockname()[1]
            conn, _ = srv.accept()
            cli.close()  # the client's active close
            time.sleep(0.05)
            conn.close()  # its FIN: the client's socket enters TIME_WAIT
            self.entered = time.monotonic()
        self.gone: float | None = None
        self.watch = threading.Thread(target=self._watch, args=(client_port,), daemon=True)
        self.watch.start()

    def _watch(self, client_port: int) -> None:
        time.sleep(max(0.0, self.entered + SS_FROM_S - time.monotonic()))
        while self.gone is None and time.monotonic() < self.entered + SS_UNTIL_S:
            listing = subprocess.run(
                # (the module's other tests' clients may take the same local port)
                [
                    "ss",
                    "-Htan",
                    "state",
                    "time-wait",
                    f"( sport = :{client_port} and dport = :{self.port} )",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            if not listing.strip():
                self.gone = time.monotonic()
            time.sleep(SS_EVERY_S)


@pytest.fixture(scope="module", autouse=True)
def natural_end(request: pytest.FixtureRequest, bpf_ready: None):
    """The 60 s test's TIME_WAIT begins as this module's first test does, and the
    module's other tests (~45 s here) run while it lasts: the test, last, waits for
    the rest only. Nothing when the test is not run (-k, the VM suite)."""
    wanted = [
        item
        for item in request.session.items
        if item.name == SIXTY_SECONDS_TEST
        and item.module is request.module
        and not item.get_closest_marker("skip")
    ]
    if not wanted:
        yield None
        return
    begun = NaturalEnd()
    yield begun
    if begun.run.proc.poll() is None:
        begun.run.proc.kill()
        begun.run.proc.communicate()


@pytest.mark.slow
# the VM suite checks TIME_WAIT's following on 6.1 in the tests above; this one adds
# 65 s of waiting for the same polls
@pytest.mark.host_only
def test_time_wait_lasts_the_kernels_60_seconds(natural_end: NaturalEnd):
    """The natural end of TIME_WAIT: the kernel's fixed 60 s (no sysctl shortens it),
    rounded up by the timer wheel (up to 2 s at HZ=250, 60.06 s to 61.96 s seen), told
    to a jiffy from the wheel's arithmetic. ss, asked every 20 ms, says when it went:
    once a poll every second told it (up to 1 s off). Begun with the module (above)."""
    natural_end.watch.join(natural_end.entered + SS_UNTIL_S + 1 - time.monotonic())
    time.sleep(1.5)
    code, out, err = natural_end.run.stop(signal.SIGINT)
    assert code == 0, err
    assert natural_end.gone is not None, f"ss still shows it after {SS_UNTIL_S:g} s"
    records = [json.loads(line) for line in out.splitlines()]
    ended = [r for r in records if r["type"] == "transition" and r["old"] == "TIME_WAIT"]
    assert [r["new"] for r in ended] == ["CLOSE"], out
    lasted = ended[0]["duration_ns"] / 1e9
    assert 60.0 <= lasted <= 62.1, out
    # ss's 20 ms, a subprocess's start, the entry's own few ms after conn.close()
    gone_after = natural_end.gone - natural_end.entered
    assert abs(lasted - gone_after) < 0.1, (lasted, gone_after)
