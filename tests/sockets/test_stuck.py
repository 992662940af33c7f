"""The stuck watch over a fake kernel scan: thresholds, scan pace, reports, the exit
list, each state's oldest socket (sockets older than tracing as lower bounds)."""

from __future__ import annotations

import socket

import pytest

from tcptrace.filters import ALL_STATES
from tcptrace.kernel.events import F_DELTA_LOWER, F_OWNER_KNOWN, F_STUCK
from tcptrace.kernel.mapscan import SCAN_EVERY, SCAN_NEW, SCAN_STUCK, ScanResult
from tcptrace.sockets.snapshot import Snapshot, SnapshotRow
from tcptrace.sockets.sockdiag import SockEntry
from tcptrace.sockets.stuck import (
    MAX_SCAN_S,
    MIN_SCAN_S,
    STUCK_STATES,
    Scanner,
    StuckWatch,
    scan_interval,
    thresholds,
)
from tcptrace.states import TcpState as S
from tests.outputs.test_output import make_event

SECOND = 1_000_000_000
CW = int(S.CLOSE_WAIT)


def test_a_bare_duration_watches_the_states_a_socket_can_be_stuck_in() -> None:
    got = thresholds({ALL_STATES: SECOND, int(S.SYN_SENT): 100})
    assert set(got) == {int(s) for s in STUCK_STATES}
    assert got[int(S.SYN_SENT)] == 100 and got[CW] == SECOND
    assert int(S.LISTEN) not in got and int(S.TIME_WAIT) not in got
    assert thresholds({CW: SECOND}) == {CW: SECOND}


@pytest.mark.parametrize("state", [S.LISTEN, S.CLOSE, S.TIME_WAIT])
def test_states_nobody_is_stuck_in_are_refused(state: S) -> None:
    with pytest.raises(ValueError, match=state.name):
        thresholds({int(state): SECOND})


def test_scan_interval_is_half_the_shortest_threshold_within_bounds() -> None:
    assert scan_interval({CW: 30 * SECOND}) == MAX_SCAN_S
    assert scan_interval({CW: SECOND, 2: SECOND // 2}) == 0.5
    assert scan_interval({CW: 1000}) == MIN_SCAN_S
    assert scan_interval({}) == MAX_SCAN_S


class FakeKernel:
    """Answers scans like kernel/loader.Probe.scan: reports each crossing once."""

    def __init__(self) -> None:
        self.sockets: dict[int, tuple[int, int]] = {}  # skaddr -> (state, entered ns)
        self.reported: set[int] = set()
        self.scans: list[int] = []
        self.threshold = SECOND
        self.every: list = []  # what a SCAN_EVERY walk finds

    def scan(self, now_ns: int, list_all: int = SCAN_NEW) -> ScanResult:
        self.scans.append(list_all)
        if list_all == SCAN_EVERY:
            return ScanResult(now_ns, {}, {}, {}, list(self.every))
        records, oldest, stuck = [], {}, {}
        for sk, (state, entered) in self.sockets.items():
            oldest[state] = min(oldest.get(state, entered), entered)
            if now_ns - entered < self.threshold:
                continue
            stuck[state] = stuck.get(state, 0) + 1
            if list_all == SCAN_STUCK or sk not in self.reported:
                self.reported.add(sk)
                records.append(
                    make_event(
                        old=state,
                        new=state,
                        delta=now_ns - entered,
                        skaddr=sk,
                        ts_ns=now_ns,
                        flags=F_STUCK,
                    )
                )
        return ScanResult(now_ns, oldest, {}, stuck, records)


def test_reports_pass_on_at_the_scan_pace_and_the_exit_list_is_oldest_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100 * SECOND]
    monkeypatch.setattr("tcptrace.sockets.stuck.time.monotonic_ns", lambda: clock[0])
    kernel = FakeKernel()
    watch = StuckWatch(Scanner(kernel), {CW: SECOND})
    watch.on_start()
    kernel.sockets = {1: (CW, clock[0] - 3 * SECOND), 2: (CW, clock[0] + SECOND // 2)}
    assert watch.on_tick(clock[0]) is None  # not yet a scan interval (1 s) since start
    clock[0] += SECOND
    first = watch.on_tick(clock[0])
    assert [ev.skaddr for ev in first] == [1]
    assert watch.on_tick(clock[0] + 1) is None  # the next scan is a second away
    clock[0] += SECOND
    second = watch.on_tick(clock[0])
    assert [ev.skaddr for ev in second] == [2]  # 1 is not reported twice
    clock[0] += SECOND
    watch.on_finish(None)
    assert [ev.skaddr for ev in watch.still] == [1, 2]  # oldest first
    assert kernel.scans[-1] == SCAN_STUCK


def old_row(state: S, port: int, inode: int) -> SnapshotRow:
    entry = SockEntry(
        family=socket.AF_INET,
        state=int(state),
        local_addr="127.0.0.1",
        local_port=port,
        remote_addr="127.0.0.1",
        remote_port=40000,
        inode=inode,
        uid=0,
        cookie=inode,
        timer=0,
        expires_ms=0,
    )
    return SnapshotRow(entry, None, netns=7)


class FakeTable:
    def __init__(self, rows: list[SockEntry]) -> None:
        self.rows = rows

    def dump(self, states, filters=None):
        return [row for row in self.rows if row.state in states]


class FakeTables:
    def __init__(self, table: FakeTable) -> None:
        self.table = table

    def get(self, netns: int = 0):
        return self.table


def test_sockets_older_than_tracing_are_checked_then_reported_as_lower_bounds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100 * SECOND]
    monkeypatch.setattr("tcptrace.sockets.stuck.time.monotonic_ns", lambda: clock[0])
    kept, gone = old_row(S.CLOSE_WAIT, 80, 11), old_row(S.CLOSE_WAIT, 81, 12)
    table = FakeTable([kept.entry])  # the second one closed since the snapshot
    watch = StuckWatch(Scanner(FakeKernel()), {CW: SECOND}, FakeTables(table))  # type: ignore[arg-type]
    snap = Snapshot(clock[0], [kept, gone, old_row(S.LISTEN, 82, 13)])
    watch.snapshot = lambda: snap
    watch.on_start()
    clock[0] += SECOND // 2
    assert watch.on_tick(clock[0]) is None  # read the snapshot; no scan before 1 s
    assert {o.row.entry.local_port for o in watch.old} == {80, 81}  # no listeners
    clock[0] += SECOND
    reports = watch.on_tick(clock[0])
    assert [(ev.sport, ev.oldstate, ev.delta_ns) for ev in reports] == [(80, CW, 3 * SECOND // 2)]
    assert reports[0].flags & F_DELTA_LOWER and reports[0].netns == 7
    oldest = watch.oldest()
    assert oldest.ages[CW] == (3 * SECOND // 2, True)
    assert oldest.stuck[CW] == 1


def test_a_snapshot_socket_the_map_already_holds_counts_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The snapshot is taken after the program attached: a socket born (or moved) in
    between is in both, and must count in the map only."""
    clock = [100 * SECOND]
    monkeypatch.setattr("tcptrace.sockets.stuck.time.monotonic_ns", lambda: clock[0])
    kept, mapped = old_row(S.CLOSE_WAIT, 80, 11), old_row(S.CLOSE_WAIT, 81, 12)
    kernel = FakeKernel()
    kernel.every = [make_event(CW, CW, sport=81, dport=40000, netns=7, flags=F_STUCK)]
    table = FakeTable([kept.entry, mapped.entry])
    watch = StuckWatch(Scanner(kernel), {CW: SECOND}, FakeTables(table))  # type: ignore[arg-type]
    snap = Snapshot(clock[0], [kept, mapped])
    watch.snapshot = lambda: snap
    watch.on_start()
    watch.on_tick(clock[0])
    assert SCAN_EVERY in kernel.scans
    assert [o.row.entry.local_port for o in watch.old] == [80]


def test_a_socket_older_than_tracing_that_moves_leaves_the_old_list_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its transition puts it in the kernel's map: counted there from then on, not also
    as an old socket until the next sock_diag check a second later."""
    clock = [100 * SECOND]
    monkeypatch.setattr("tcptrace.sockets.stuck.time.monotonic_ns", lambda: clock[0])
    moving, staying = old_row(S.ESTABLISHED, 80, 11), old_row(S.ESTABLISHED, 81, 12)
    table = FakeTable([moving.entry, staying.entry])
    watch = StuckWatch(Scanner(FakeKernel()), {}, FakeTables(table), oldest_wanted=True)  # type: ignore[arg-type]
    snap = Snapshot(clock[0], [moving, staying])
    watch.snapshot = lambda: snap
    watch.on_start()
    watch.on_tick(clock[0])
    assert watch.oldest().count[int(S.ESTABLISHED)] == 2
    elsewhere = make_event(S.ESTABLISHED, S.FIN_WAIT1, sport=80, dport=40000, netns=8)
    watch.on_events([elsewhere])  # the same ends in another namespace
    assert watch.oldest().count[int(S.ESTABLISHED)] == 2
    watch.on_events([make_event(S.ESTABLISHED, S.FIN_WAIT1, sport=80, dport=40000, netns=7)])
    assert [o.row.entry.local_port for o in watch.old] == [81]
    assert watch.oldest().count[int(S.ESTABLISHED)] == 1


# --- --stuck on a capture (-r) ------------------------------------------------------

MS = 1_000_000


def _move(old, new, sk, ts):
    from tests.outputs.test_output import make_event

    return make_event(old, new, skaddr=sk, ts_ns=ts, pid=7, flags=F_OWNER_KNOWN)


def test_a_capture_reports_each_socket_once_when_it_crosses_before_what_follows():
    from tcptrace.sockets.stuck import CaptureStuck

    watch = CaptureStuck({int(S.CLOSE_WAIT): 10 * MS, int(S.SYN_SENT): 10 * MS})
    leak = _move(S.ESTABLISHED, S.CLOSE_WAIT, 1, 0)
    quick = _move(S.CLOSE, S.SYN_SENT, 2, 1 * MS)
    moved = _move(S.SYN_SENT, S.ESTABLISHED, 2, 5 * MS)
    later = _move(S.CLOSE, S.LISTEN, 3, 15 * MS)
    batches = watch.split([leak, quick, moved, later])
    # the report, stamped when it crossed (10 ms, its age then), before the 15 ms line
    assert [[ev.ts_ns for ev in batch] for batch in batches] == [
        [0, 1 * MS, 5 * MS],
        [10 * MS],
        [15 * MS],
    ]
    (report,) = batches[1]
    assert report.flags & F_STUCK and report.delta_ns == 10 * MS and report.pid == 7
    assert (report.oldstate, report.newstate) == (S.CLOSE_WAIT, S.CLOSE_WAIT)
    # once per visit; at the end (the capture's END time), still stuck with its age then
    assert watch.split([_move(S.CLOSE, S.LISTEN, 4, 30 * MS)]) == [
        [_move(S.CLOSE, S.LISTEN, 4, 30 * MS)]
    ]
    assert watch.finish(50 * MS) == []
    assert [(ev.skaddr, ev.delta_ns) for ev in watch.still] == [(1, 50 * MS)]


def test_a_capture_reports_crossings_after_its_last_transition_at_its_end():
    from tcptrace.sockets.stuck import CaptureStuck

    watch = CaptureStuck({int(S.CLOSE_WAIT): 10 * MS})
    assert len(watch.split([_move(S.ESTABLISHED, S.CLOSE_WAIT, 1, 0)])) == 1
    assert watch.still == []  # 0 ms old at the last transition
    (report,) = watch.finish(25 * MS)
    assert report.ts_ns == 10 * MS and report.delta_ns == 10 * MS
    assert [ev.delta_ns for ev in watch.still] == [25 * MS]
    # a socket that left in time is never reported
    other = CaptureStuck({int(S.CLOSE_WAIT): 10 * MS})
    other.split([_move(S.ESTABLISHED, S.CLOSE_WAIT, 1, 0)])
    other.split([_move(S.CLOSE_WAIT, S.LAST_ACK, 1, 9 * MS)])
    assert other.finish(60 * MS) == [] and other.still == []
