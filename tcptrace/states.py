"""The TCP state table: Linux's numbers and the names users know from ss/netstat."""

from __future__ import annotations

import enum


class TcpState(enum.IntEnum):
    """Linux TCP states (include/net/tcp_states.h)."""

    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12


# Size of per-state tables indexed by state number (index 0 unused); matches
# TCPTRACE_NSTATES in bpf/tcptrace.h.
NSTATES = 13

# The states a user sees, in the order of a connection's life.
LIFECYCLE_ORDER: tuple[TcpState, ...] = (
    TcpState.LISTEN,
    TcpState.SYN_SENT,
    TcpState.SYN_RECV,
    TcpState.ESTABLISHED,
    TcpState.FIN_WAIT1,
    TcpState.FIN_WAIT2,
    TcpState.CLOSING,
    TcpState.TIME_WAIT,
    TcpState.CLOSE_WAIT,
    TcpState.LAST_ACK,
    TcpState.CLOSE,
)

# Names users type that mean a state: RFC 793 spellings and common short forms.
_ALIASES = {
    "CLOSED": TcpState.CLOSE,
    "SYN_RECEIVED": TcpState.SYN_RECV,
    "FIN_WAIT_1": TcpState.FIN_WAIT1,
    "FIN_WAIT_2": TcpState.FIN_WAIT2,
    "TIMEWAIT": TcpState.TIME_WAIT,
    "ESTAB": TcpState.ESTABLISHED,
}


def state_name(value: int) -> str:
    """Name of a state number; unknown numbers print as UNKNOWN(n)."""
    try:
        return TcpState(value).name
    except ValueError:
        return f"UNKNOWN({value})"


def parse_state(text: str) -> TcpState:
    """Parse a state name, case-insensitive, '-' or '_' alike (TIME-WAIT, time_wait)."""
    key = text.strip().upper().replace("-", "_")
    if key in TcpState.__members__:
        return TcpState[key]
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(f"unknown TCP state {text!r}")


def state_mask(states: set[TcpState] | frozenset[TcpState]) -> int:
    """Bitmask with bit n set for state n, as SHOW_STATES in the BPF program."""
    mask = 0
    for state in states:
        mask |= 1 << int(state)
    return mask


def is_birth(oldstate: int, newstate: int) -> bool:
    """A socket's first transition: from CLOSE, or a child cloned from its listener.

    Time "spent" in the old state means nothing for these.
    """
    return oldstate == TcpState.CLOSE or (
        oldstate == TcpState.LISTEN and newstate == TcpState.SYN_RECV
    )
