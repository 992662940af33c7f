"""--metrics: address parsing, exact histogram buckets, and the exposition over real HTTP."""

import random
import socket
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tcptrace.errors import TcptraceError
from tcptrace.kernel.events import C_FAST
from tcptrace.kernel.stats import StateStats, Summary
from tcptrace.outputs.metrics import (
    BUCKET_EXPONENTS,
    ListenAddress,
    MetricsServer,
    StateCollector,
    histogram_buckets,
    parse_listen_address,
)
from tcptrace.states import TcpState as S


@pytest.mark.parametrize(
    "text,host,port",
    [
        ("9876", "127.0.0.1", 9876),
        ("0.0.0.0:9876", "0.0.0.0", 9876),
        ("10.1.2.3:1", "10.1.2.3", 1),
        ("localhost:9876", "127.0.0.1", 9876),
        ("[::1]:65535", "::1", 65535),
        ("[::]:9876", "::", 9876),
    ],
)
def test_listen_addresses(text, host, port):
    assert parse_listen_address(text) == ListenAddress(host, port)


@pytest.mark.parametrize(
    "text,message",
    [
        ("0", "out of range"),
        ("65536", "out of range"),
        ("http", "not a port number"),
        ("", "not a port number"),
        ("example.com:9876", "not an IP address"),
        ("1.2.3:9876", "not an IP address"),
        ("::1:9876", "[ADDR]:PORT"),
        ("[::1]9876", "[ADDR]:PORT"),
        ("127.0.0.1:", "not a port number"),
    ],
)
def test_bad_listen_addresses(text, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_listen_address(text)


def test_listen_address_prints_as_typed():
    assert str(ListenAddress("::1", 9)) == "[::1]:9"
    assert str(ListenAddress("127.0.0.1", 9)) == "127.0.0.1:9"


def test_histogram_buckets_are_exact():
    rng = random.Random(3)
    values = [int(rng.lognormvariate(12, 3)) for _ in range(5000)] + [2**20, 2**20 - 1]
    stats = StateStats()
    for v in values:
        stats.add(v)
    buckets = histogram_buckets(stats.hist)
    assert len(buckets) == len(BUCKET_EXPONENTS) + 1
    for (le, count), k in zip(buckets, BUCKET_EXPONENTS):
        assert float(le) == (1 << k) / 1e9
        assert count == sum(1 for v in values if v < (1 << k))
    assert buckets[-1] == ("+Inf", float(len(values)))


def sample_summary():
    s = Summary()
    s.record(S.CLOSE, S.LISTEN, 0, False)
    for _ in range(3):
        s.record(S.CLOSE, S.SYN_SENT, 0, False)
        s.record(S.SYN_SENT, S.ESTABLISHED, 40_000, True)
        s.record(S.LISTEN, S.SYN_RECV, 0, False)
        s.record(S.SYN_RECV, S.ESTABLISHED, 10_000, True)
    s.record(S.ESTABLISHED, S.FIN_WAIT1, 2_000_000_000, True)
    s.record(S.ESTABLISHED, S.CLOSE_WAIT, 0, False)  # seen mid-life
    s.counters[0] = 15
    s.counters[2] = 4
    s.lost = 1
    return s


def samples(text):
    """{(name, frozenset(labels)): value} from the exposition text."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found, name, **labels):
    return found[(name, frozenset(labels.items()))]


def test_collector_exposes_the_summary():
    registry = CollectorRegistry()
    registry.register(StateCollector(sample_summary, "port 443"))
    found = samples(generate_latest(registry).decode())
    assert value(found, "tcptrace_transitions_total", old="SYN_SENT", new="ESTABLISHED") == 3
    assert value(found, "tcptrace_transitions_total", old="CLOSE", new="LISTEN") == 1
    assert value(found, "tcptrace_state_duration_seconds_count", state="SYN_SENT") == 3
    assert value(found, "tcptrace_state_duration_seconds_sum", state="SYN_SENT") == 120e-6
    le = repr(2**16 / 1e9)  # 65.5 µs: all three SYN_SENT (40 µs) are below
    assert value(found, "tcptrace_state_duration_seconds_bucket", state="SYN_SENT", le=le) == 3
    le = repr(2**15 / 1e9)
    assert value(found, "tcptrace_state_duration_seconds_bucket", state="SYN_SENT", le=le) == 0
    assert value(found, "tcptrace_state_duration_seconds_count", state="ESTABLISHED") == 1
    assert not any(name == "tcptrace_state_untimed_exits_total" for name, _ in found)
    # 6 reached ESTABLISHED, 1 of them left it (the other exit is a socket seen
    # mid-life, never counted in); the listener stays in LISTEN
    assert value(found, "tcptrace_sockets", state="ESTABLISHED") == 5
    assert value(found, "tcptrace_sockets", state="LISTEN") == 1
    assert value(found, "tcptrace_sockets", state="SYN_SENT") == 0
    assert value(found, "tcptrace_events_traced_total") == 15
    assert value(found, "tcptrace_events_lost_total") == 4  # dropped 4, perf's 1 among them
    assert value(found, "tcptrace_info", version="0.1.0", filter="port 443") == 1
    assert not any(name == "tcptrace_events_faster_total" for name, _ in found)


def test_collector_counts_what_was_faster_than_slower_than():
    def slower_summary():
        s = sample_summary()
        s.slower_than = "1s"
        s.counters[C_FAST] = 11
        return s

    registry = CollectorRegistry()
    registry.register(StateCollector(slower_summary, "port 443, slower than 1s"))
    found = samples(generate_latest(registry).decode())
    # every transition is still traced and counted; the fast ones were not lost
    assert value(found, "tcptrace_events_traced_total") == 15
    assert value(found, "tcptrace_events_faster_total") == 11
    assert value(found, "tcptrace_events_lost_total") == 4


def test_server_answers_over_loopback_and_stops():
    with socket.socket() as probe_port:
        probe_port.bind(("127.0.0.1", 0))
        port = probe_port.getsockname()[1]
    server = MetricsServer(ListenAddress("127.0.0.1", port), sample_summary)
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            found = samples(resp.read().decode())
        assert value(found, "tcptrace_events_traced_total") == 15
        assert ("process_cpu_seconds_total", frozenset()) in found  # what watching costs
    finally:
        server.on_finish(Summary())
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        server = MetricsServer(ListenAddress("127.0.0.1", port), Summary)
        with pytest.raises(TcptraceError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            server.start()


def test_counters_never_step_back_when_user_space_relabels_late():
    # a scrape sees the kernel's FIN_WAIT2 -> CLOSE before user space relabels it
    readings = []
    early = Summary()
    early.record(S.FIN_WAIT2, S.CLOSE, 5_000, True)
    late = Summary()
    late.record(S.FIN_WAIT2, S.TIME_WAIT, 5_000, True)
    readings += [early, late]
    registry = CollectorRegistry()
    registry.register(StateCollector(lambda: readings.pop(0)))
    first = samples(generate_latest(registry).decode())
    second = samples(generate_latest(registry).decode())
    closed = dict(name="tcptrace_transitions_total", old="FIN_WAIT2", new="CLOSE")
    assert value(first, **closed) == 1 and value(second, **closed) == 1
    assert value(second, "tcptrace_transitions_total", old="FIN_WAIT2", new="TIME_WAIT") == 1
    assert value(second, "tcptrace_state_duration_seconds_count", state="FIN_WAIT2") == 1


def test_oldest_and_stuck_gauges():
    from tcptrace.sockets.stuck import Oldest

    cw = int(S.CLOSE_WAIT)
    oldest = Oldest(0, {cw: (42_000_000_000, False)}, {}, {cw: 2})
    registry = CollectorRegistry()
    registry.register(StateCollector(sample_summary, "", lambda: oldest, stuck_states=[cw, 2]))
    found = samples(generate_latest(registry).decode())
    assert value(found, "tcptrace_state_oldest_seconds", state="CLOSE_WAIT") == 42.0
    assert value(found, "tcptrace_sockets_stuck", state="CLOSE_WAIT") == 2
    assert value(found, "tcptrace_sockets_stuck", state="SYN_SENT") == 0
