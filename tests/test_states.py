import pytest

from tcptrace.states import NSTATES, TcpState, is_birth, parse_state, state_mask, state_name


def test_linux_numbers():
    assert TcpState.ESTABLISHED == 1
    assert TcpState.TIME_WAIT == 6
    assert TcpState.CLOSE == 7
    assert TcpState.LISTEN == 10
    assert max(TcpState) < NSTATES


@pytest.mark.parametrize(
    "text,state",
    [
        ("TIME_WAIT", TcpState.TIME_WAIT),
        ("time-wait", TcpState.TIME_WAIT),
        ("closed", TcpState.CLOSE),
        ("SYN-RECEIVED", TcpState.SYN_RECV),
        (" listen ", TcpState.LISTEN),
        ("fin-wait-2", TcpState.FIN_WAIT2),
    ],
)
def test_parse_state(text, state):
    assert parse_state(text) is state


def test_parse_state_rejects_unknown():
    with pytest.raises(ValueError, match="unknown TCP state 'LISTENING'"):
        parse_state("LISTENING")


def test_state_name_and_mask():
    assert state_name(2) == "SYN_SENT"
    assert state_name(99) == "UNKNOWN(99)"
    assert state_mask({TcpState.ESTABLISHED, TcpState.LISTEN}) == (1 << 1) | (1 << 10)


def test_births_have_no_time_in_old_state():
    assert is_birth(TcpState.CLOSE, TcpState.SYN_SENT)
    assert is_birth(TcpState.LISTEN, TcpState.SYN_RECV)
    assert not is_birth(TcpState.LISTEN, TcpState.CLOSE)
