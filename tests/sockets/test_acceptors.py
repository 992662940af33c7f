"""Handshake lines of a shared listener name the process that accepted (no kernel)."""

import io

from tcptrace.kernel.events import F_ACCEPTED, F_OWNER_KNOWN, F_OWNER_SHARED
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


def accepted(sk, ts, pid=WORKER, port=PORT):
    return make_event(
        NO_STATE,
        NO_STATE,
        skaddr=sk,
        ts_ns=ts,
        pid=pid,
        sport=port,
        netns=NETNS,
        flags=F_ACCEPTED | F_OWNER_KNOWN,
        comm=b"nginx".ljust(16, b"\0"),
    )


def test_nothing_is_held_until_an_accept_shows_a_listener_shared():
    stage = Acceptors()
    events = handshake(1, 100)
    assert stage.on_events(events) is None
    # the accept record goes no further, and from now on the listener is shared
    assert stage.on_events([accepted(1, 200)]) == []
    assert stage.shared == {(NETNS, PORT)}


def test_handshake_lines_wait_for_their_accept_and_name_the_acceptor():
    clock = Clocked()
    stage = Acceptors(lambda: {(NETNS, PORT)}, clock=clock)
    later = line(TcpState.SYN_SENT, TcpState.ESTABLISHED, 9, 150, pid=300, port=40000)
    assert stage.on_events([*handshake(1, 100), later]) == []  # all wait, in order
    out = stage.on_events([accepted(1, 200)])
    assert [(ev.ts_ns, ev.pid) for ev in out] == [(100, WORKER), (110, WORKER), (150, 300)]
    assert stage.named == 1 and not stage.waiting


def test_a_listener_not_shared_is_not_held():
    stage = Acceptors(lambda: {(NETNS, PORT)})
    other = handshake(1, 100, port=9090)
    assert stage.on_events(other) == other


def test_no_accept_within_the_hold_names_the_creator_as_one_of_the_holders():
    clock = Clocked()
    stage = Acceptors(lambda: {(NETNS, PORT)}, clock=clock)
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
    stage = Acceptors(lambda: {(NETNS, PORT)}, clock=clock)
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
    stage = Acceptors(lambda: {(NETNS, PORT)})
    assert stage.on_events(handshake(1, 100)) == []
    out = stage.on_drained(0)
    assert [ev.flags & F_OWNER_SHARED for ev in out] == [F_OWNER_SHARED] * 2


def test_beyond_max_held_the_oldest_waiting_goes_out_unnamed():
    clock = Clocked()
    stage = Acceptors(lambda: {(NETNS, PORT)}, clock=clock)
    assert stage.on_events(handshake(1, 100)) == []
    after = [
        line(TcpState.SYN_SENT, TcpState.ESTABLISHED, 9, 200 + i, port=40000)
        for i in range(MAX_HELD)
    ]
    out = stage.on_events(after)
    assert len(out) == MAX_HELD + 2 and out[0].flags & F_OWNER_SHARED
