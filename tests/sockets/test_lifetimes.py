"""Connection lifetimes from event sequences; owners and lower bounds from enrichment."""

from __future__ import annotations

import dataclasses
import io
import socket

import pytest

from tcptrace.filters import Filters
from tcptrace.kernel.events import (
    F_DELTA_KNOWN,
    F_DELTA_LOWER,
    F_OWNER_KNOWN,
    LIFE_VISITS,
    Event,
    Life,
)
from tcptrace.sockets.enrich import Owners
from tcptrace.sockets.lifetimes import Lifetimes
from tcptrace.sockets.procs import Owner
from tcptrace.sockets.snapshot import Snapshot, SnapshotRow
from tcptrace.sockets.sockdiag import SockEntry
from tcptrace.states import TcpState as S

LO = socket.inet_pton(socket.AF_INET, "127.0.0.1").ljust(16, b"\0")
MS = 1_000_000


def ev(old, new, ts_ms, delta_ms=None, sk=1, sport=40000, dport=443, pid=7, flags=None, **kw):
    if flags is None:
        flags = F_OWNER_KNOWN | (F_DELTA_KNOWN if delta_ms is not None else 0)
    fields = dict(
        ts_ns=ts_ms * MS,
        delta_ns=(delta_ms or 0) * MS,
        skaddr=sk,
        cgroup_id=0,
        pid=pid,
        flags=flags,
        netns=0,
        jiffies=0,
        saddr=LO,
        daddr=LO,
        sport=sport,
        dport=dport,
        family=socket.AF_INET,
        oldstate=int(old),
        newstate=int(new),
        comm=b"curl",
    )
    fields.update(kw)
    return Event(**fields)


def collect(events):
    done = []
    tracker = Lifetimes(done.extend)
    tracker.on_events(events)
    return done, tracker


def test_active_close_through_time_wait():
    done, tracker = collect(
        [
            ev(S.CLOSE, S.SYN_SENT, 0),
            ev(S.SYN_SENT, S.ESTABLISHED, 1, 1),
            ev(S.ESTABLISHED, S.FIN_WAIT1, 1001, 1000),
            ev(S.FIN_WAIT1, S.FIN_WAIT2, 1002, 1),
            ev(S.FIN_WAIT2, S.TIME_WAIT, 1010, 8),
            # the full socket is gone: its address is reused by a new connection
            ev(S.CLOSE, S.SYN_SENT, 1500, sport=40001),
        ]
    )
    assert done == []  # still in TIME_WAIT
    tracker.on_events([ev(S.TIME_WAIT, S.CLOSE, 61010, 60000)])
    (life,) = done
    assert (life.pid, life.comm, life.local_port, life.remote_port) == (7, "curl", 40000, 443)
    assert life.complete and life.duration_ns == 61010 * MS
    assert [(s.state, s.duration_ns // MS) for s in life.states] == [
        ("SYN_SENT", 1),
        ("ESTABLISHED", 1000),
        ("FIN_WAIT1", 1),
        ("FIN_WAIT2", 8),
        ("TIME_WAIT", 60000),
    ]
    # a plain dataclass: JSON/CSV writers serialise it as is
    assert dataclasses.asdict(life)["states"][0] == {
        "state": "SYN_SENT",
        "duration_ns": MS,
        "lower_bound": False,
    }
    assert list(tracker.open) == [1]  # the new connection on the reused address


def test_socket_older_than_tracing_is_a_lower_bound_and_listeners_are_not_connections():
    done, _ = collect(
        [
            ev(S.CLOSE, S.LISTEN, 0, sk=9),
            ev(S.ESTABLISHED, S.CLOSE_WAIT, 5000, 2000, flags=F_DELTA_LOWER),
            ev(S.CLOSE_WAIT, S.LAST_ACK, 5100, 100),
            ev(S.LAST_ACK, S.CLOSE, 5101, 1),
            ev(S.LISTEN, S.CLOSE, 6000, 6000, sk=9),
        ]
    )
    (life,) = done
    assert not life.complete
    assert (life.pid, life.comm) == (7, "curl")  # the first known owner
    assert life.duration_ns == (5101 - 3000) * MS
    assert life.states[0].lower_bound and life.states[0].duration_ns == 2000 * MS


def test_unattributed_event_gets_a_dash_not_the_current_task():
    owners = Owners(Filters(), tables=None)
    out = owners.on_events([ev(S.ESTABLISHED, S.CLOSE_WAIT, 10, 5, flags=F_DELTA_KNOWN)])
    assert out is not None
    assert (out[0].pid, out[0].command, out[0].owner_known) == (0, "", False)


def test_snapshot_gives_owner_and_lower_bound():
    entry = SockEntry(socket.AF_INET, S.ESTABLISHED, "127.0.0.1", 40000, "127.0.0.1", 443,
                      1234, 0, 1, 0, 0)  # fmt: skip
    listener = SockEntry(socket.AF_INET, S.LISTEN, "0.0.0.0", 443, "0.0.0.0", 0, 99, 0, 2, 0, 0)
    owners = Owners(Filters(), tables=None)
    owners.snapshot = Snapshot(
        taken_ns=1000 * MS,
        rows=[SnapshotRow(entry, Owner(55, "psql")), SnapshotRow(listener, Owner(66, "nginx"))],
    )
    first = ev(S.ESTABLISHED, S.FIN_WAIT1, 3500, flags=0, pid=0)
    child = ev(S.LISTEN, S.SYN_RECV, 3600, flags=0, sport=443, dport=50000, sk=2)
    later = ev(S.SYN_RECV, S.ESTABLISHED, 3601, 1, flags=F_DELTA_KNOWN, sport=443, sk=2)
    out = owners.on_events([first, child, later])
    assert (out[0].pid, out[0].command) == (55, "psql")
    assert out[0].delta_lower and out[0].delta_ns == 2500 * MS
    # a child's listener is the kernel's to name (the snapshot seeds it): one the
    # kernel left unnamed has several listeners since, and only sock_diag can tell
    assert (out[1].pid, out[1].command) == (0, "")
    assert not out[1].delta_lower  # a birth: no time in LISTEN to speak of


def kernel_life(close_ev, birth_ms, visited, visits=None):
    """The kernel's life record of a connection ending with close_ev."""
    return Life(
        close_ev,
        birth_ms * MS,
        bytes(int(s) for s, _ in visited).ljust(LIFE_VISITS, b"\0"),
        tuple(ms * MS for _, ms in visited) + (0,) * (LIFE_VISITS - len(visited)),
        len(visited) if visits is None else visits,
    )


def kernel_tracker(*records):
    done: list = []
    lives: dict = {}
    tracker = Lifetimes(done.extend)
    tracker.use_kernel(lives)
    for record in records:
        lives[(record.event.skaddr, record.event.ts_ns)] = record
    return done, tracker, lives


def test_a_kernel_record_is_a_whole_connection():
    close = ev(S.LAST_ACK, S.CLOSE, 1100, 2)
    record = kernel_life(
        close, 100, [(S.SYN_SENT, 1), (S.ESTABLISHED, 900), (S.CLOSE_WAIT, 97), (S.LAST_ACK, 2)]
    )
    done, tracker, lives = kernel_tracker(record)
    tracker.on_events([close])
    (life,) = done
    assert (life.pid, life.comm, life.local_port, life.remote_port) == (7, "curl", 40000, 443)
    assert life.complete and (life.start_ns, life.end_ns) == (100 * MS, 1100 * MS)
    assert life.duration_ns == 1000 * MS
    assert [(s.state, s.duration_ns // MS) for s in life.states] == [
        ("SYN_SENT", 1),
        ("ESTABLISHED", 900),
        ("CLOSE_WAIT", 97),
        ("LAST_ACK", 2),
    ]
    assert not lives and not tracker.open  # taken: nothing kept


def test_a_kernel_record_ending_in_time_wait_waits_for_its_end():
    close = ev(S.FIN_WAIT2, S.CLOSE, 1010, 8)
    record = kernel_life(
        close, 1, [(S.SYN_SENT, 1), (S.ESTABLISHED, 1000), (S.FIN_WAIT1, 1), (S.FIN_WAIT2, 8)]
    )
    done, tracker, _ = kernel_tracker(record)
    # TIME_WAIT following relabelled the kernel's end
    tracker.on_events([close._replace(newstate=int(S.TIME_WAIT))])
    assert done == []
    tracker.on_events([ev(S.TIME_WAIT, S.CLOSE, 61010, 60000, sk=99)])
    (life,) = done
    assert [s.state for s in life.states][-2:] == ["FIN_WAIT2", "TIME_WAIT"]
    assert life.duration_ns == 61009 * MS


def test_a_kernel_record_held_back_takes_its_whole_fin_wait2_later():
    """TIME_WAIT following holds back the kernel's FIN_WAIT2 -> CLOSE of a socket whose
    timewait socket still waits for the peer's FIN: the record waits, and the later
    FIN_WAIT2 -> TIME_WAIT has the whole time in FIN_WAIT2."""
    close = ev(S.FIN_WAIT2, S.CLOSE, 1010, 8)
    record = kernel_life(
        close, 1, [(S.SYN_SENT, 1), (S.ESTABLISHED, 1000), (S.FIN_WAIT1, 1), (S.FIN_WAIT2, 8)]
    )
    done, tracker, lives = kernel_tracker(record)
    tracker.on_events([])  # the stage before held the event back
    assert not lives and done == []
    tracker.on_events([ev(S.FIN_WAIT2, S.TIME_WAIT, 3002, 2000, flags=F_OWNER_KNOWN | 0x20001)])
    tracker.on_events([ev(S.TIME_WAIT, S.CLOSE, 63002, 60000)])
    (life,) = done
    assert [(s.state, s.duration_ns // MS) for s in life.states] == [
        ("SYN_SENT", 1),
        ("ESTABLISHED", 1000),
        ("FIN_WAIT1", 1),
        ("FIN_WAIT2", 2000),
        ("TIME_WAIT", 60000),
    ]


def test_a_kernel_record_of_a_socket_older_than_tracing():
    close = ev(S.FIN_WAIT2, S.CLOSE, 5000, 10)
    record = kernel_life(close, 0, [(S.ESTABLISHED, 0), (S.FIN_WAIT1, 40), (S.FIN_WAIT2, 10)])
    done, tracker, _ = kernel_tracker(record)
    tracker.on_events([close])
    (life,) = done
    assert not life.complete
    assert (life.states[0].state, life.states[0].duration_ns) == ("ESTABLISHED", None)
    # it began at least as long ago as the times known
    assert life.start_ns == 4950 * MS and life.duration_ns == 50 * MS


def test_a_kernel_record_first_seen_closing_takes_enrichments_lower_bound():
    close = ev(S.ESTABLISHED, S.CLOSE, 5000, 2000, flags=F_OWNER_KNOWN | F_DELTA_LOWER)
    record = kernel_life(close._replace(flags=F_OWNER_KNOWN), 0, [(S.ESTABLISHED, 0)])
    done, tracker, _ = kernel_tracker(record)
    tracker.on_events([close])
    (life,) = done
    assert life.states[0].lower_bound and life.states[0].duration_ns == 2000 * MS
    assert life.start_ns == 3000 * MS and not life.complete


def test_kernel_records_with_state_filter_keep_connections_that_visited_them():
    done: list = []
    lives: dict = {}
    tracker = Lifetimes(done.extend, states=[S.SYN_RECV])
    tracker.use_kernel(lives)
    client = ev(S.LAST_ACK, S.CLOSE, 100, 1, sk=1)
    server = ev(S.LAST_ACK, S.CLOSE, 100, 1, sk=2, sport=443, dport=40000)
    lives[(1, 100 * MS)] = kernel_life(client, 1, [(S.SYN_SENT, 1), (S.LAST_ACK, 1)])
    lives[(2, 100 * MS)] = kernel_life(server, 1, [(S.SYN_RECV, 1), (S.LAST_ACK, 1)])
    tracker.on_events([client, server])
    assert [life.local_port for life in done] == [443]


def test_a_kernel_record_past_its_slots_names_the_last_one_so():
    close = ev(S.LAST_ACK, S.CLOSE, 100, 1)
    visited = [(S.ESTABLISHED, 1)] * (LIFE_VISITS - 1) + [(S.LAST_ACK, 3)]
    done, tracker, _ = kernel_tracker(kernel_life(close, 1, visited, visits=LIFE_VISITS + 2))
    tracker.on_events([close])
    (life,) = done
    assert life.states[-1].state == "LAST_ACK+2" and len(life.states) == LIFE_VISITS


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("owned", [True, False])
@pytest.mark.parametrize("numeric", [True, False])
@pytest.mark.parametrize("wide", [True, False])
def test_a_whole_kernel_record_prints_as_its_lifetime_would(family, owned, numeric, wide):
    """The text output's per-record path (record_line) prints what the Lifetime made
    of the same record prints (line)."""

    from tcptrace.kernel.events import F_DELTA_KNOWN, F_OWNER_KNOWN, LIFE_STRUCT, life_of
    from tcptrace.outputs.output import TS_WALL, Clock, LifetimeFormatter
    from tcptrace.sockets.lifetimes import _from_record

    addr = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    raw = socket.inet_pton(family, addr).ljust(16, b"\0")
    flags = F_DELTA_KNOWN | (F_OWNER_KNOWN if owned else 0)
    times = (40_123, 4_400_567, 150_001, 8_049, 0, 0, 0, 0)
    end = 10**12
    event = (end, 8_049, 0xFFFF1234, 77, 4242, flags, 4026531833, 0, raw, raw, 44321, 443,
             family, 5, 7, b"curl".ljust(16, b"\0"))  # fmt: skip
    fields = (*event, end - sum(times) - 1_000, *times, bytes([2, 1, 4, 5, 0, 0, 0, 0]), 4, 0)
    record = life_of(LIFE_STRUCT.unpack(LIFE_STRUCT.pack(*fields)))
    ev = record.event
    clock = Clock(TS_WALL, start_mono_ns=end - 5 * 10**9, offset_ns=1_700_000_000 * 10**9)
    from tcptrace.sockets.places import Places

    fast = LifetimeFormatter(io.StringIO(), clock, numeric=numeric, places=Places(), wide=wide)
    slow = LifetimeFormatter(io.StringIO(), clock, numeric=numeric, places=Places(), wide=wide)
    life = _from_record(ev, record)
    life.end_ns = end
    life.duration_ns = end - life.start_ns
    assert fast.record_line(ev, record) == slow.line(life)
