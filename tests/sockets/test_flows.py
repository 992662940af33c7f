"""Sockets entering, leaving and in each state, from the transition counts."""

from tcptrace.kernel.stats import Summary
from tcptrace.sockets.flows import lost_events, sockets_in_states, state_flows
from tcptrace.states import TcpState as S
from tcptrace.states import is_birth

CLIENT = [
    (S.CLOSE, S.SYN_SENT),
    (S.SYN_SENT, S.ESTABLISHED),
    (S.ESTABLISHED, S.FIN_WAIT1),
    (S.FIN_WAIT1, S.FIN_WAIT2),
    (S.FIN_WAIT2, S.CLOSE),
]
ACCEPTED = [
    (S.LISTEN, S.SYN_RECV),
    (S.SYN_RECV, S.ESTABLISHED),
    (S.ESTABLISHED, S.CLOSE_WAIT),
    (S.CLOSE_WAIT, S.LAST_ACK),
    (S.LAST_ACK, S.CLOSE),
]


def replay(transitions):
    summary = Summary()
    for old, new in transitions:
        # as the kernel: a socket's first transition has no time in the state it left
        summary.record(old, new, 1000, not is_birth(old, new))
    return summary


def test_a_child_of_a_listener_does_not_take_it_out_of_listen():
    summary = replay([(S.CLOSE, S.LISTEN), *ACCEPTED[:2]])
    entered, left = state_flows(summary)
    assert entered[S.SYN_RECV] == 1 and left[S.SYN_RECV] == 1
    assert left.get(S.LISTEN, 0) == 0
    now = sockets_in_states(summary)
    assert now[S.LISTEN] == 1 and now[S.ESTABLISHED] == 1 and now[S.SYN_RECV] == 0


def test_connections_in_flight_and_finished():
    # two established connections (both ends), one finished, a listener
    summary = replay([(S.CLOSE, S.LISTEN), *CLIENT, *ACCEPTED, *(CLIENT[:2] + ACCEPTED[:2]) * 2])
    now = sockets_in_states(summary)
    assert now[S.ESTABLISHED] == 4
    assert now[S.LISTEN] == 1
    assert sum(now.values()) == 5
    assert S.CLOSE not in now  # not a place where sockets stay


def test_sockets_from_before_start_never_make_a_negative_count():
    summary = Summary()
    summary.record(S.ESTABLISHED, S.FIN_WAIT1, 0, False)  # older than tracing: untimed
    summary.record(S.FIN_WAIT1, S.FIN_WAIT2, 1000, True)
    now = sockets_in_states(summary)
    assert now[S.ESTABLISHED] == 0
    assert now[S.FIN_WAIT1] == 0
    assert now[S.FIN_WAIT2] == 1


def test_older_sockets_leaving_a_state_do_not_hide_newer_ones_in_it():
    # issue 16: two connections opened since start, two older ones closing
    summary = replay((CLIENT[:2] + ACCEPTED[:2]) * 2)
    for _ in range(2):
        summary.record(S.ESTABLISHED, S.FIN_WAIT1, 0, False)
        summary.record(S.ESTABLISHED, S.CLOSE_WAIT, 0, False)
    now = sockets_in_states(summary)
    assert now[S.ESTABLISHED] == 4
    assert now[S.FIN_WAIT1] == now[S.CLOSE_WAIT] == 2


def test_lost_events_count_each_loss_once():
    summary = Summary()
    summary.counters[2] = 5  # perf buffer full, counted by the kernel at submission
    summary.counters[3] = 7  # shed
    summary.lost = 11  # perf's lost records: the same drops again (here read later, more)
    assert lost_events(summary) == 11 + 7
