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
