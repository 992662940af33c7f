"""What the kernel's transition counts say: sockets entering, leaving and in each state.

Shared by the live table (--interval) and the metrics (--metrics); works on a
stats.Summary, so the numbers are exact even when per-event output loses events.
"""

from __future__ import annotations

from tcptrace.kernel.stats import Summary
from tcptrace.states import LIFECYCLE_ORDER, TcpState


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
    """Sockets in each state now, among those that entered it since start (CLOSE is not
    a place).

    A socket that existed before tracing started leaves its first state after an
    unknown time: the kernel has no start for it, so its departure is untimed. The
    timed departures are exactly those of sockets whose entry was counted, so the
    sockets in a state now are the entries minus the timed departures (the kernel
    reads its histograms before its transition counts, so a reading never holds a
    departure without its entry). Sockets from before tracing are left out until they
    enter a new state; a socket evicted from the kernel's full per-socket map leaves
    its state untimed and stays counted in it. The floor at zero only guards
    --local-port: a connect() is then counted from the transition that chose its port
    (SYN_SENT -> ESTABLISHED), with a time, its entry into SYN_SENT never.
    """
    entered, _ = state_flows(summary)
    counts: dict[int, int] = {}
    for state in LIFECYCLE_ORDER:
        if state == TcpState.CLOSE:
            continue
        stats = summary.states.get(int(state))
        timed_left = stats.count if stats is not None else 0
        counts[int(state)] = max(0, entered.get(state, 0) - timed_left)
    return counts


def lost_events(summary: Summary) -> int:
    """Events not delivered to user space: perf buffer full or shed (each counted once)."""
    return summary.lost_total
