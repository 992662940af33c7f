"""Handshake lines of a shared listener name the process that accepted (no kernel)."""

import io

from tcptrace.kernel.events import (
    C_SEEN,
    F_ACCEPTED,
    F_MATCHED,
    F_MOVED,
    F_OWNER_KNOWN,
    F_OWNER_SHARED,
    F_UNDECIDED,
)
from tcptrace.kernel.stats import Summary
from tcptrace.outputs.export import NOTE_OWNER_SHARED, transition_note
from tcptrace.outputs.output import Clock, TextFormatter
from tcptrace.sockets.acceptors import HOLD_NS, MAX_HELD, NO_STATE, Acceptors
from tcptrace.states import TcpState
from tests.outputs.test_output import make_event

PORT = 8080
MASTER, WORKER = 100, 200
NETNS = 4026531840


class Clocked:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


def line(old, new, sk, ts, pid=MASTER, port=PORT):
    comm = b"nginx".ljust(16, b"\0")
    return make_event(old, new, skaddr=sk, ts_ns=ts, pid=pid, sport=port, netns=NETNS, comm=comm)


def handshake(sk, ts, port=PORT):
    return [
        line(TcpState.LISTEN, TcpState.SYN_RECV, sk, ts, port=port),
        line(TcpState.SYN_RECV, TcpState.ESTABLISHED, sk, ts + 10, port=port),
    ]


def accepted(sk, ts, pid=WORKER, port=PORT, moved=True):
    """An accept record; moved: its lines named another process (F_MOVED)."""
    return make_event(
        NO_STATE,
        NO_STATE,
        skaddr=sk,
        ts_ns=ts,
        pid=pid,
        sport=port,
        netns=NETNS,
        flags=F_ACCEPTED | F_OWNER_KNOWN | (F_MOVED if moved else 0),
        comm=b"nginx".ljust(16, b"\0"),
    )


def shared(clock=None) -> Acceptors:
    """A stage that knows the listener on PORT shared (the start-up snapshot saw it)."""
    stage = Acceptors(clock=clock) if clock is not None else Acceptors()
    stage.share([(NETNS, PORT)])
    return stage


def test_nothing_is_held_until_an_accept_shows_a_listener_shared():
    stage = Acceptors()
    events = handshake(1, 100)
    assert stage.on_events(events) is None
    # the accept record goes no further, and from now on the listener is shared
    assert stage.on_events([accepted(1, 200)]) == []
    assert stage.shared == {(NETNS, PORT)}


def test_handshake_lines_wait_for_their_accept_and_name_the_acceptor():
    clock = Clocked()
    stage = shared(clock)
    later = line(TcpState.SYN_SENT, TcpState.ESTABLISHED, 9, 150, pid=300, port=40000)
    assert stage.on_events([*handshake(1, 100), later]) == []  # all wait, in order
    out = stage.on_events([accepted(1, 200)])
    assert [(ev.ts_ns, ev.pid) for ev in out] == [(100, WORKER), (110, WORKER), (150, 300)]
    assert stage.named == 1 and not stage.waiting


def test_a_listener_not_shared_is_not_held():
    stage = shared()
    other = handshake(1, 100, port=9090)
    assert stage.on_events(other) == other


def test_no_accept_within_the_hold_names_the_creator_as_one_of_the_holders():
    clock = Clocked()
    stage = shared(clock)
    assert stage.on_events(handshake(1, 100)) == []
    clock.now += HOLD_NS - 1
    assert stage.on_tick(clock.now) == []
    clock.now += 1
    out = stage.on_tick(clock.now)
    assert [ev.pid for ev in out] == [MASTER, MASTER]
    assert all(ev.flags & F_OWNER_SHARED for ev in out)
    assert transition_note(out[0].flags) == NOTE_OWNER_SHARED
    assert stage.unnamed == 1
    # text: the pid marked as one of several
    fmt = TextFormatter(io.StringIO(), Clock("none"), numeric=True)
    assert fmt.line(out[0]).split()[0] == f"{MASTER}+"
    # a late accept changes nothing told
    assert stage.on_events([accepted(1, 5_000)]) == []


def test_an_accept_after_later_lines_names_them_too_and_releases_in_order():
    clock = Clocked()
    stage = shared(clock)
    first, second = handshake(1, 100), handshake(2, 120)
    closing = line(TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, 1, 135)  # before its accept
    assert stage.on_events([*first, *second, closing]) == []
    # the second is accepted first: the first still waits, and so does all after it
    assert stage.on_events([accepted(2, 140)]) == []
    out = stage.on_events([accepted(1, 150, pid=WORKER + 1)])
    assert [(ev.ts_ns, ev.skaddr, ev.pid) for ev in out] == [
        (100, 1, WORKER + 1),
        (110, 1, WORKER + 1),
        (120, 2, WORKER),
        (130, 2, WORKER),
        (135, 1, WORKER + 1),
    ]


def test_at_exit_what_still_waits_goes_out_unnamed():
    stage = shared()
    assert stage.on_events(handshake(1, 100)) == []
    out = stage.on_drained(0)
    assert [ev.flags & F_OWNER_SHARED for ev in out] == [F_OWNER_SHARED] * 2


def test_beyond_max_held_the_oldest_waiting_goes_out_unnamed():
    clock = Clocked()
    stage = shared(clock)
    assert stage.on_events(handshake(1, 100)) == []
    after = [
        line(TcpState.SYN_SENT, TcpState.ESTABLISHED, 9, 200 + i, port=40000)
        for i in range(MAX_HELD)
    ]
    out = stage.on_events(after)
    assert len(out) == MAX_HELD + 2 and out[0].flags & F_OWNER_SHARED


def undecided(sk, ts):
    """A shared listener's child whose creator does not match --pid (kernel: F_UNDECIDED)."""
    return [ev._replace(flags=ev.flags | F_UNDECIDED) for ev in handshake(sk, ts)]


def filtered(clock=None) -> Acceptors:
    stage = Acceptors(clock=clock or Clocked(), owner_filtered=True)
    stage.share([(NETNS, PORT)])
    return stage


def test_under_owner_filters_a_matching_acceptor_takes_its_handshake_and_counts_it():
    stage = filtered()
    assert stage.on_events(undecided(1, 100)) == []
    out = stage.on_events(
        [accepted(1, 200)._replace(flags=F_ACCEPTED | F_OWNER_KNOWN | F_MOVED | F_MATCHED)]
    )
    assert [(ev.pid, ev.flags & F_UNDECIDED) for ev in out] == [(WORKER, 0), (WORKER, 0)]
    summary = Summary()
    stage.on_finish(summary)
    assert summary.counters[C_SEEN] == 2
    assert summary.transitions == {
        (TcpState.LISTEN, TcpState.SYN_RECV): 1,
        (TcpState.SYN_RECV, TcpState.ESTABLISHED): 1,
    }


def test_under_owner_filters_another_acceptors_connection_is_dropped_and_uncounted():
    stage = filtered()
    # undecided: never counted, simply dropped
    assert stage.on_events(undecided(1, 100)) == []
    assert stage.on_events([accepted(1, 200)]) == []
    # the creator matched (--pid MASTER): the kernel counted these, another accepted
    assert stage.on_events(handshake(2, 300)) == []
    assert stage.on_events([accepted(2, 400)]) == []
    summary = Summary()
    summary.counters[C_SEEN] = 2
    summary.transitions.update(
        {(TcpState.LISTEN, TcpState.SYN_RECV): 1, (TcpState.SYN_RECV, TcpState.ESTABLISHED): 1}
    )
    stage.on_finish(summary)
    assert summary.counters[C_SEEN] == 0 and summary.transitions == {}


def test_under_owner_filters_an_undecided_child_nobody_accepted_in_time_goes():
    clock = Clocked()
    stage = filtered(clock)
    assert stage.on_events(undecided(1, 100)) == []
    assert stage.on_tick(clock.now) == []  # the tick after the batch
    clock.now += HOLD_NS
    assert stage.on_tick(clock.now) == []
    assert not stage.waiting


def test_a_new_socket_at_a_waiting_sockets_address_is_not_taken_for_it():
    """A child that closed while waiting for an accept that never came (its acceptor
    was its listener's creator: no record) freed its address; a client socket born
    there next is another socket. Its lines once joined the old wait, and went out a
    second later marked as a shared listener's."""
    clock = Clocked()
    stage = shared(clock)
    closing = [
        line(TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, 1, 120),
        line(TcpState.CLOSE_WAIT, TcpState.LAST_ACK, 1, 130),
        line(TcpState.LAST_ACK, TcpState.CLOSE, 1, 140),
    ]
    assert stage.on_events([*handshake(1, 100), *closing]) == []
    born = line(TcpState.CLOSE, TcpState.SYN_SENT, 1, 150, pid=300, port=40000)
    out = stage.on_events([born])
    assert [ev.ts_ns for ev in out] == [100, 110, 120, 130, 140, 150]
    assert not out[-1].flags & F_OWNER_SHARED and not stage.waiting


def test_a_shared_listener_that_closed_leaves_its_port_unshared():
    """A later listener on the same port is another socket, not shared until an accept
    shows it so: its children's lines do not wait a second, nor go out marked shared."""
    told: list = []
    stage = Acceptors(mark_shared=lambda netns, port, is_shared: told.append(is_shared))
    stage.on_events([line(TcpState.CLOSE, TcpState.LISTEN, 7, 10)])
    stage.on_events([accepted(1, 20)])
    assert stage.shared == {(NETNS, PORT)} and told == [True]
    stage.on_events([line(TcpState.LISTEN, TcpState.CLOSE, 7, 30)])
    assert stage.shared == set() and told == [True, False]
    later = [line(TcpState.CLOSE, TcpState.LISTEN, 8, 40), *handshake(2, 50)]
    assert stage.on_events(later) is None and not stage.waiting  # as read, none held


def test_an_accept_read_before_its_handshake_lines_names_them_at_once():
    """A record can reach user space after a later-stamped record of another CPU (its
    program was held up between stamping and writing: an emulated guest's vCPU taken
    off its host CPU). The accept came first; the lines it names came next. They once
    waited a second for an accept already gone by and went out marked shared, naming
    the master (CI, bookworm guest: test_a_forked_servers_handshake_lines...)."""
    clock = Clocked()
    stage = shared(clock)
    assert stage.on_events([accepted(1, 200)]) == []
    out = stage.on_events(handshake(1, 100))
    assert [(ev.ts_ns, ev.pid, ev.flags & F_OWNER_SHARED) for ev in out] == [
        (100, WORKER, 0),
        (110, WORKER, 0),
    ]
    assert stage.named == 1 and stage.unnamed == 0 and not stage.waiting


def test_an_accept_before_the_childs_established_names_that_line_at_once():
    """accept() can dequeue a child between its queueing and its SYN_RECV ->
    ESTABLISHED (inet_accept allows SYN_RECV): that line comes after the accept and
    is the acceptor's, told without waiting for another accept."""
    clock = Clocked()
    stage = shared(clock)
    birth, established = handshake(1, 100)
    assert stage.on_events([birth]) == []
    assert [ev.pid for ev in stage.on_events([accepted(1, 105)])] == [WORKER]
    late = established._replace(ts_ns=108, pid=WORKER)
    out = stage.on_events([late])
    assert [(ev.pid, ev.flags & F_OWNER_SHARED) for ev in out] == [(WORKER, 0)]
    assert not stage.waiting and stage.named == 1


def test_a_socket_born_after_an_early_accept_at_its_address_waits_for_its_own():
    clock = Clocked()
    stage = shared(clock)
    assert stage.on_events([accepted(1, 200)]) == []
    assert stage.on_events(handshake(1, 300)) == []  # another socket: its own accept
    out = stage.on_events([accepted(1, 400, pid=WORKER + 1)])
    assert [ev.pid for ev in out] == [WORKER + 1] * 2


def test_an_early_accept_is_forgotten_after_the_hold():
    clock = Clocked()
    stage = shared(clock)
    assert stage.on_events([accepted(1, 200)]) == []
    stage.on_tick(clock.now)  # the tick after the batch
    clock.now += HOLD_NS
    stage.on_tick(clock.now)
    assert not stage.early
    assert stage.on_events(handshake(1, 100)) == []  # held: nothing names them now


def test_under_owner_filters_an_early_accept_decides_its_lines():
    stage = filtered()
    mine = accepted(1, 200)._replace(flags=F_ACCEPTED | F_OWNER_KNOWN | F_MOVED | F_MATCHED)
    assert stage.on_events([mine, accepted(2, 210)]) == []
    out = stage.on_events([*undecided(1, 100), *undecided(2, 105)])
    assert [(ev.skaddr, ev.pid, ev.flags & F_UNDECIDED) for ev in out] == [
        (1, WORKER, 0),
        (1, WORKER, 0),
    ]
    summary = Summary()
    stage.on_finish(summary)
    assert summary.counters[C_SEEN] == 2


def test_an_output_blocked_after_a_batch_does_not_end_its_waits():
    """The stages after this one blocked on a pipe read late: the tick after that
    batch counts the wait as of the batch's read, so the accept records that came
    meanwhile are read first (tests/integration/test_owners.py, the stalled output)."""
    clock = Clocked()
    stage = shared(clock)
    assert stage.on_events(handshake(1, 100)) == []
    clock.now += 5 * HOLD_NS
    assert stage.on_tick(clock.now) == []
    out = stage.on_events([accepted(1, 200)])
    assert [(ev.pid, ev.flags & F_OWNER_SHARED) for ev in out] == [(WORKER, 0)] * 2
    # no accept at all: the next tick without a batch before it ends the wait
    assert stage.on_events(handshake(2, 300)) == []
    clock.now += 5 * HOLD_NS
    assert stage.on_tick(clock.now) == []
    assert [ev.flags & F_OWNER_SHARED for ev in stage.on_tick(clock.now)] == [F_OWNER_SHARED] * 2


def test_an_accept_that_only_names_an_owner_nobody_knew_shares_nothing():
    """Its lines named nobody (no F_MOVED): the listener is not shown shared, and the
    next handshakes go out as read, not held."""
    stage = Acceptors()
    assert stage.on_events([accepted(1, 200, moved=False)]) == []
    assert stage.shared == set()
    assert stage.on_events(handshake(2, 300)) is None
