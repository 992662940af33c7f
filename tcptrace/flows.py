"""What the kernel's transition counts say: sockets entering, leaving and in each state.

Shared by the live table (--interval) and the metrics (--metrics); works on a
stats.Summary, so the numbers are exact even when per-event output loses events.
"""

from __future__ import annotations

from tcptrace.states import LIFECYCLE_ORDER, TcpState
from tcptrace.stats import Summary


def state_flows(summary: Summary) -> tuple[dict[int, int], dict[int, int]]:
    """Sockets that entered and that left each state, from the transition counts.

    A child cloned from a listener (LISTEN -> SYN_RECV) enters SYN_RECV while the
    listener stays in LISTEN, so that transition is not a departure from LISTEN.
    """
    entered: dict[int, int] = {}
    left: dict[int, int] = {}
    for (old, new), n in summary.transitions.items():
        entered[new] = entered.get(new, 0) + n
        if not (old == TcpState.LISTEN and new == TcpState.SYN_RECV):
            left[old] = left.get(old, 0) + n
    return entered, left


def sockets_in_states(summary: Summary) -> dict[int, int]:
    """Sockets in each state now, from transitions since start (CLOSE is not a place).

    Sockets that existed before tracing started are not counted; one of them leaving
    a state could make the difference negative, so it is floored at zero.
    """
    entered, left = state_flows(summary)
    return {
        int(state): max(0, entered.get(state, 0) - left.get(state, 0))
        for state in LIFECYCLE_ORDER
        if state != TcpState.CLOSE
    }


def lost_events(summary: Summary) -> int:
    """Events not delivered to user space: perf buffer full or shed (each counted once)."""
    return summary.lost_total
