import socket

import pytest

from tcptrace.filters import (
    PORT_ANY,
    PORT_LOCAL,
    PORT_REMOTE,
    Filters,
    describe_ports,
    parse_ports,
    parse_states,
)
from tcptrace.states import TcpState


def test_parse_lists_and_ranges():
    assert parse_ports("80,443") == {80, 443}
    assert parse_ports("8000-8003") == {8000, 8001, 8002, 8003}
    assert parse_ports("22, 80-81") == {22, 80, 81}
    assert parse_ports("65535") == {65535}


@pytest.mark.parametrize(
    "text,message",
    [
        ("0", "out of range"),
        ("65536", "out of range"),
        ("90-80", "reversed port range"),
        ("http", "not a port number"),
        ("80,", "empty item"),
        ("-5", "not a port number"),
    ],
)
def test_parse_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_ports(text)


def test_parse_states():
    assert parse_states("SYN_SENT,time-wait") == {TcpState.SYN_SENT, TcpState.TIME_WAIT}
    with pytest.raises(ValueError):
        parse_states("SYN_SENT,bogus")


def test_port_flags_and_checks():
    f = Filters(
        ports=frozenset({80}), local_ports=frozenset({80, 81}), remote_ports=frozenset({5432})
    )
    assert f.port_checks == PORT_ANY | PORT_LOCAL | PORT_REMOTE
    assert f.port_flags() == {80: PORT_ANY | PORT_LOCAL, 81: PORT_LOCAL, 5432: PORT_REMOTE}
    assert Filters().port_checks == 0


def test_matches_socket():
    f = Filters(ports=frozenset({443}))
    assert f.matches_socket(socket.AF_INET, 443, 50000)
    assert f.matches_socket(socket.AF_INET, 50000, 443)
    assert not f.matches_socket(socket.AF_INET, 50000, 80)
    local = Filters(local_ports=frozenset({443}), family=socket.AF_INET6)
    assert local.matches_socket(socket.AF_INET6, 443, 1)
    assert not local.matches_socket(socket.AF_INET6, 1, 443)
    assert not local.matches_socket(socket.AF_INET, 443, 1)


def test_state_mask_shows_into_or_out_of():
    f = Filters(states=frozenset({TcpState.SYN_SENT}))
    assert f.shows(TcpState.CLOSE, TcpState.SYN_SENT)
    assert f.shows(TcpState.SYN_SENT, TcpState.ESTABLISHED)
    assert not f.shows(TcpState.ESTABLISHED, TcpState.FIN_WAIT1)
    assert Filters().shows(TcpState.ESTABLISHED, TcpState.FIN_WAIT1)


def test_describe():
    assert describe_ports(frozenset({80, 443, 8000, 8001, 8002})) == "80,443,8000-8002"
    assert Filters().describe() == "all TCP sockets"
    assert Filters(ports=frozenset({443}), family=socket.AF_INET).describe() == "port 443, IPv4"


def test_durations_take_units_and_bare_seconds() -> None:
    from tcptrace.filters import parse_duration

    assert parse_duration("100ms") == 100_000_000
    assert parse_duration("1.5m") == 90_000_000_000
    assert parse_duration("2s") == parse_duration("2") == 2_000_000_000
    assert parse_duration("250us") == 250_000


@pytest.mark.parametrize("text", ["0", "0s", "-1s", "1x", "", "ms", "nan", "1e-12s"])
def test_bad_durations_are_refused(text: str) -> None:
    from tcptrace.filters import parse_duration

    with pytest.raises(ValueError):
        parse_duration(text)


def test_state_durations_name_states_or_all() -> None:
    from tcptrace.filters import (
        ALL_STATES,
        merge_state_durations,
        parse_state_durations,
        per_state,
    )
    from tcptrace.states import TcpState

    got = parse_state_durations("SYN_SENT=100ms,ESTABLISHED=5s")
    assert got == {int(TcpState.SYN_SENT): 100_000_000, int(TcpState.ESTABLISHED): 5_000_000_000}
    merged = merge_state_durations((parse_state_durations("1s"), got))
    assert merged[ALL_STATES] == 1_000_000_000
    states = per_state(merged, [TcpState.SYN_SENT, TcpState.CLOSE_WAIT])
    assert states == {int(TcpState.SYN_SENT): 100_000_000, int(TcpState.CLOSE_WAIT): 10**9}
    assert per_state(got, [TcpState.CLOSE_WAIT]) == {}
    for bad in ("SYN=1s", "CLOSE_WAIT=0", "1s,2s", "CLOSE_WAIT=1s,close-wait=2s", ","):
        with pytest.raises(ValueError):
            parse_state_durations(bad)


def test_slower_than_refuses_states_it_cannot_judge() -> None:
    from tcptrace.filters import ALL_STATES, parse_slower_than
    from tcptrace.states import TcpState

    assert parse_slower_than("1s,LISTEN=1h") == {
        ALL_STATES: 1_000_000_000,
        int(TcpState.LISTEN): 3_600_000_000_000,  # a long-lived listener's close is slow
    }
    for text, reason in (
        ("TIME_WAIT=1s", "TIME_WAIT: the kernel never reports its end"),
        ("1s,time-wait=2s", "judged by the time in FIN_WAIT2 or CLOSING"),
        ("CLOSED=1s", "CLOSE is never left"),
        ("NEW_SYN_RECV=1ms", "NEW_SYN_RECV: the kernel never reports it"),
    ):
        with pytest.raises(ValueError, match=reason):
            parse_slower_than(text)


def test_slower_than_thresholds_per_state_and_description() -> None:
    from tcptrace.filters import ALL_STATES, JUDGED_STATES, describe_state_durations
    from tcptrace.states import TcpState

    est, syn = int(TcpState.ESTABLISHED), int(TcpState.SYN_SENT)
    # a bare duration covers every judged state not named; never CLOSE or TIME_WAIT
    filters = Filters(slower_than=((est, 5_000_000_000), (ALL_STATES, 2_000_000_000)))
    slow = filters.slow_ns()
    assert set(slow) == {int(s) for s in JUDGED_STATES}
    assert {TcpState.CLOSE, TcpState.TIME_WAIT, TcpState.NEW_SYN_RECV}.isdisjoint(slow)
    assert slow[est] == 5_000_000_000 and slow[int(TcpState.LISTEN)] == 2_000_000_000
    # states not named, without a bare duration: never slow (no threshold)
    assert Filters(slower_than=((syn, 100_000_000),)).slow_ns() == {syn: 100_000_000}
    assert Filters().slow_ns() == {}
    # as the user writes it, the bare duration first, in the largest exact unit
    assert describe_state_durations(filters.slower_than) == "2s,ESTABLISHED=5s"
    assert describe_state_durations([(syn, 1_500_000_000), (est, 90 * 10**9)]) == (
        "SYN_SENT=1500ms,ESTABLISHED=90s"
    )
    assert describe_state_durations([(ALL_STATES, 250_000)]) == "250us"
    assert Filters(ports=frozenset({443}), slower_than=filters.slower_than).describe() == (
        "port 443, slower than 2s,ESTABLISHED=5s"
    )
