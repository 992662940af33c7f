"""The real program on real loopback connections: exact sequences and sane durations."""

from __future__ import annotations

import platform
import socket
import time
from collections.abc import Callable

import pytest

from tcptrace.filters import Filters
from tcptrace.kernel.events import Event
from tcptrace.states import TcpState as S

from .netutil import free_port, listener, set_reset_on_close

pytestmark = pytest.mark.usefixtures("bpf_ready")


@pytest.fixture(scope="module")
def probe_factory():
    from tcptrace.kernel.loader import Probe, ProbeConfig

    probes = []

    def make(filters: Filters) -> Probe:
        probe = Probe(ProbeConfig(filters=filters, buffer_pages=64))
        probes.append(probe)
        return probe

    yield make
    for probe in probes:
        probe.close()


def collect(probe, action: Callable[[], None], settle: float = 0.1) -> list[Event]:
    action()
    time.sleep(settle)
    probe.detach()
    events: list[Event] = []
    while batch := probe.poll_events(0):
        events += batch
    return events


def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def seq(events: list[Event], local_port: int | None = None) -> list[tuple[int, int]]:
    return [(e.oldstate, e.newstate) for e in events if local_port is None or e.sport == local_port]


def by_socket(events: list[Event]) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = {}
    for e in events:
        out.setdefault(e.skaddr, []).append(e)
    return out


def test_active_and_passive_close_sequences(probe_factory):
    port = free_port()
    probe = probe_factory(Filters(ports=frozenset({port})))
    client_port = 0

    def action():
        nonlocal client_port
        with listener(port=port) as srv:
            cli = socket.create_connection(("127.0.0.1", port))
            client_port = cli.getsockname()[1]
            conn, _ = srv.accept()
            time.sleep(0.05)
            cli.close()  # active close: client ends in TIME_WAIT
            time.sleep(0.05)
            conn.close()  # passive side: CLOSE_WAIT -> LAST_ACK -> CLOSE

    events = collect(probe, action)
    socks = by_socket(events)
    client = next(s for s in socks.values() if s[-1].sport == client_port)
    assert [(e.oldstate, e.newstate) for e in client] == [
        (S.CLOSE, S.SYN_SENT),
        (S.SYN_SENT, S.ESTABLISHED),
        (S.ESTABLISHED, S.FIN_WAIT1),
        (S.FIN_WAIT1, S.FIN_WAIT2),
        (S.FIN_WAIT2, S.CLOSE),
    ]
    server = [s for s in socks.values() if s[0].oldstate == S.LISTEN and s[-1].dport == client_port]
    assert len(server) == 1
    # The child's LISTEN -> SYN_RECV: before Linux 6.15 (commit "inet: consolidate
    # inet_csk_clone_lock()") the tracepoint fires before the clone gets its own 4-tuple and
    # reports the listener's (remote port 0); from 6.15 on it reports the connection's.
    child_tuple = kernel_version() >= (6, 15)
    assert server[0][0].dport == (client_port if child_tuple else 0)
    assert [(e.oldstate, e.newstate) for e in server[0]] == [
        (S.LISTEN, S.SYN_RECV),
        (S.SYN_RECV, S.ESTABLISHED),
        (S.ESTABLISHED, S.CLOSE_WAIT),
        (S.CLOSE_WAIT, S.LAST_ACK),
        (S.LAST_ACK, S.CLOSE),
    ]
    lst = [s for s in socks.values() if s[0].newstate == S.LISTEN]
    assert [(e.oldstate, e.newstate) for e in lst[0]] == [(S.CLOSE, S.LISTEN), (S.LISTEN, S.CLOSE)]
    # ESTABLISHED lasted at least the 50 ms the client waited before closing
    est = next(e for e in client if e.oldstate == S.ESTABLISHED)
    assert est.delta_known and 50_000_000 <= est.delta_ns < 5_000_000_000
    # every event after the first of a socket carries a measured duration
    for events_of_sock in socks.values():
        assert all(e.delta_known for e in events_of_sock[1:])
    # the owner: this very process, on every line of the client and the server
    import os

    for e in client + server[0]:
        assert e.owner_known and e.pid == os.getpid()


def test_refused_connection(probe_factory):
    port = free_port()
    probe = probe_factory(Filters(ports=frozenset({port})))

    def action():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port))

    assert seq(collect(probe, action)) == [(S.CLOSE, S.SYN_SENT), (S.SYN_SENT, S.CLOSE)]


def test_reset_closes_both_ends_from_established(probe_factory):
    port = free_port()
    probe = probe_factory(Filters(ports=frozenset({port})))

    def action():
        with listener(port=port) as srv:
            cli = socket.create_connection(("127.0.0.1", port))
            conn, _ = srv.accept()
            set_reset_on_close(conn)
            conn.close()
            time.sleep(0.05)
            cli.close()

    transitions = seq(collect(probe, action))
    # the server resets: its socket and the client's both go ESTABLISHED -> CLOSE
    assert transitions.count((S.ESTABLISHED, S.CLOSE)) == 2
    assert (S.FIN_WAIT1, S.FIN_WAIT2) not in transitions


def test_ipv6(probe_factory):
    port = free_port(socket.AF_INET6)
    probe = probe_factory(Filters(ports=frozenset({port}), family=socket.AF_INET6))

    def action():
        with listener(socket.AF_INET6, port=port) as srv:
            cli = socket.create_connection(("::1", port))
            conn, _ = srv.accept()
            cli.close()
            conn.close()

    events = collect(probe, action)
    assert (S.SYN_SENT, S.ESTABLISHED) in seq(events)
    assert all(e.family == socket.AF_INET6 for e in events)
    assert {e.local_addr for e in events} == {"::1"}


def test_ipv4_mapped_shows_as_ipv4(probe_factory):
    port = free_port(socket.AF_INET6)
    probe = probe_factory(Filters(ports=frozenset({port})))

    def action():
        srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv.bind(("::", port))
        srv.listen()
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        cli.close()
        conn.close()
        srv.close()

    events = collect(probe, action)
    accepted = [e for e in events if e.oldstate == S.SYN_RECV]
    assert accepted and accepted[0].family == socket.AF_INET6
    assert accepted[0].local_addr == "127.0.0.1"
    assert accepted[0].remote_addr == "127.0.0.1"


def test_port_filter_does_not_match_other_ports(probe_factory):
    port, other = free_port(), free_port()
    while other == port:
        other = free_port()
    probe = probe_factory(Filters(ports=frozenset({port})))

    def action():
        with listener(port=other) as srv:
            cli = socket.create_connection(("127.0.0.1", other))
            conn, _ = srv.accept()
            cli.close()
            conn.close()

    assert collect(probe, action) == []
    # the in-kernel counters saw nothing either: filtering happens in the kernel
    from tcptrace.kernel.events import C_SEEN

    assert probe.summary().counters[C_SEEN] == 0


def test_local_port_filter_keeps_connect_start_time(probe_factory):
    """--local-port on a client: connect() enters SYN_SENT before the port is chosen."""
    port = free_port()
    client_port = free_port()
    probe = probe_factory(Filters(local_ports=frozenset({client_port})))

    def action():
        with listener(port=port) as srv:
            cli = socket.socket()
            cli.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            cli.bind(("127.0.0.1", client_port))
            cli.connect(("127.0.0.1", port))
            conn, _ = srv.accept()
            cli.close()
            conn.close()

    events = collect(probe, action)
    assert seq(events)[:2] == [(S.CLOSE, S.SYN_SENT), (S.SYN_SENT, S.ESTABLISHED)]
    assert all(e.sport == client_port for e in events)


def test_syn_sent_duration_covers_a_dropped_syn(probe_factory):
    """A full accept queue drops the SYN; the client's retransmission 1 s later gets in."""
    port = free_port()
    probe = probe_factory(Filters(ports=frozenset({port}), states=frozenset()))
    delayed_port = 0

    def action():
        nonlocal delayed_port
        with listener(port=port, backlog=0) as srv:
            first = socket.create_connection(("127.0.0.1", port))  # fills the queue
            time.sleep(0.05)
            second = socket.socket()
            second.setblocking(False)
            second.connect_ex(("127.0.0.1", port))  # its SYN is dropped
            time.sleep(0.3)
            delayed_port = second.getsockname()[1]
            conn, _ = srv.accept()  # room again: the retransmitted SYN gets in
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if second.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    try:
                        second.getpeername()
                        break
                    except OSError:
                        pass
                time.sleep(0.05)
            for s in (first, second, conn):
                s.close()

    events = collect(probe, action)
    est = [
        e
        for e in events
        if e.sport == delayed_port and (e.oldstate, e.newstate) == (S.SYN_SENT, S.ESTABLISHED)
    ]
    assert len(est) == 1
    # SYN_SENT lasted until the retransmission: at least the 1 s initial RTO
    assert 0.9e9 <= est[0].delta_ns < 4e9


def test_close_after_shutdown_is_not_a_transition(probe_factory):
    """close() after shutdown(SHUT_WR) sets the FIN_WAIT state again: no X -> X line."""
    port = free_port()
    probe = probe_factory(Filters(ports=frozenset({port})))

    def action():
        with listener(port=port) as srv:
            cli = socket.create_connection(("127.0.0.1", port))
            conn, _ = srv.accept()
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.05)
            conn.close()
            time.sleep(0.05)
            cli.close()

    transitions = seq(collect(probe, action))
    assert all(old != new for old, new in transitions), transitions
    assert transitions.count((S.ESTABLISHED, S.FIN_WAIT1)) == 1
