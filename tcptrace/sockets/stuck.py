"""Stuck sockets: in their current state longer than a threshold (--stuck), found by
the kernel, and each state's oldest socket (the live table's OLDEST, the metrics).

The kernel keeps every traced socket's state and the time it entered it; a scan of
that map in the kernel (kernel/loader.Probe.scan, a BPF iterator) returns per state
the oldest entry and the sockets that crossed their threshold since the last scan.
Python never walks the map. Sockets older than tracing are not in it until their
next transition: those come from the start-up snapshot, with the time since
tracing began as a lower bound on their age, checked with sock_diag when they
would cross a threshold (they may have gone, or moved on, since).
"""

from __future__ import annotations

import operator
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tcptrace.filters import Filters, per_state
from tcptrace.kernel.events import (
    F_DELTA_KNOWN,
    F_DELTA_LOWER,
    F_NETNS_KNOWN,
    F_OWNER_KNOWN,
    F_STUCK,
    Event,
    make_event,
    raw_address,
)
from tcptrace.kernel.mapscan import SCAN_EVERY, SCAN_NEW, SCAN_STUCK
from tcptrace.sockets.snapshot import Snapshot, SnapshotRow
from tcptrace.sockets.sockdiag import SockEntry, SocketTables
from tcptrace.stages import Stage
from tcptrace.states import TcpState

if TYPE_CHECKING:
    from tcptrace.sockets.enrich import Owners

# The states a socket can be stuck in: a bare --stuck DUR applies to these. LISTEN
# lasts as long as its server and CLOSE is no state; TIME_WAIT sockets have left the
# kernel's map (and last the kernel's fixed 60 s).
STUCK_STATES: tuple[TcpState, ...] = (
    TcpState.SYN_SENT,
    TcpState.SYN_RECV,
    TcpState.ESTABLISHED,
    TcpState.FIN_WAIT1,
    TcpState.FIN_WAIT2,
    TcpState.CLOSE_WAIT,
    TcpState.CLOSING,
    TcpState.LAST_ACK,
)
NOT_STUCK = {
    TcpState.LISTEN: "a listener stays in LISTEN as long as its server runs",
    TcpState.CLOSE: "CLOSE is where a socket ends, not a state it can stay in",
    TcpState.TIME_WAIT: "TIME_WAIT lasts the kernel's fixed 60 s and its sockets have "
    "left the kernel's map (tcptrace follows them with sock_diag)",
}
# Scan at least this often, and at most: the shortest threshold in between. A socket
# is reported within one scan interval of crossing its threshold. Each scan walks the
# kernel's whole map (about 14 ms of CPU for 65,536 sockets: benchmarks/scan.py), so a
# second keeps a full map under 2% of a CPU.
MIN_SCAN_S = 0.1
MAX_SCAN_S = 1.0
# A scrape's walk is at most this old: scrapes are seconds apart, and one read right
# after sockets came or went must count them (a busy scraper: at most 10 walks a second)
SCRAPE_SCAN_S = 0.1
# How often sockets older than tracing are checked again (still there, in the same
# state?) while something reads OLDEST: an age shown is never staler than this.
OLD_RECHECK_S = 1.0


def thresholds(durations: dict[int, int]) -> dict[int, int]:
    """--stuck's {state or ALL_STATES: ns} as {state: ns}; ValueError for a state
    nobody can be stuck in."""
    for state in durations:
        if state and TcpState(state) in NOT_STUCK:
            name = TcpState(state).name
            raise ValueError(f"--stuck {name}=...: {NOT_STUCK[TcpState(state)]}")
    return per_state(durations, STUCK_STATES)


def scan_interval(stuck_ns: dict[int, int]) -> float:
    """Seconds between scans: the shortest threshold, within MIN_SCAN_S..MAX_SCAN_S."""
    if not stuck_ns:
        return MAX_SCAN_S
    return min(MAX_SCAN_S, max(MIN_SCAN_S, min(stuck_ns.values()) / 1e9))


class ScanSource(Protocol):
    """What the kernel side offers (kernel/loader.Probe)."""

    def scan(self, now_ns: int, list_all: int = SCAN_NEW): ...


@dataclass
class Oldest:
    """Each state's oldest socket now (age in ns, and whether that is a lower bound), how
    many sockets are in it (older ones included) and how many are stuck."""

    taken_ns: int = 0
    ages: dict[int, tuple[int, bool]] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    stuck: dict[int, int] = field(default_factory=dict)


@dataclass
class OldSocket:
    """A socket of the start-up snapshot, not yet seen to move: in `state` since at least
    `since_ns` (when tracing began)."""

    row: SnapshotRow
    since_ns: int
    reported: bool = False


class Scanner:
    """The kernel's map scan, shared by the stuck watch, the live table and the metrics
    thread: one scan at a time, and a recent one is reused."""

    def __init__(self, source: ScanSource) -> None:
        self.source = source
        self.lock = threading.Lock()
        self.last = None  # the latest ScanResult
        self.closed = False

    def scan(self, which: int = SCAN_NEW):
        """A walk of the map now; its records are which's (loader.SCAN_*)."""
        with self.lock:
            if self.closed:
                return self.last
            result = self.source.scan(time.monotonic_ns(), list_all=which)
            if which == SCAN_NEW:
                self.last = result
            return result

    def latest(self, max_age_s: float):
        """A scan no older than max_age_s (its stuck reports belong to whoever scanned)."""
        last = self.last
        if last is not None and time.monotonic_ns() - last.now_ns <= max_age_s * 1e9:
            return last
        return self.scan()

    def close(self) -> None:
        with self.lock:
            self.closed = True


class StuckWatch(Stage):
    """--stuck: scans the kernel's map once a scan interval and hands on a stuck report
    (an F_STUCK event) per socket that crossed its state's threshold; at exit, lists
    what is still stuck. Also the source of each state's oldest socket."""

    def __init__(
        self,
        scanner: Scanner,
        stuck_ns: dict[int, int],
        tables: SocketTables | None = None,
        filters: Filters | None = None,
        oldest_wanted: bool = False,
    ) -> None:
        self.scanner = scanner
        self.stuck_ns = stuck_ns
        self.interval_ns = int(scan_interval(stuck_ns) * 1e9)
        self.tables = tables
        self.filters = filters
        # the start-up snapshot, once taken (enrich.Owners takes it when there is one)
        self.snapshot: Callable[[], Snapshot | None] | None = None
        # the owners' look-ups, for the final list (reports pass through them as events)
        self.enrich: Callable[[list[Event]], list[Event] | None] | None = None
        self.started_ns = 0
        self.next_scan_ns = 0
        self.old: list[OldSocket] | None = None  # None until the snapshot is read
        # the old list as on_events looks it up: by 4-tuple, and their local ports
        self._indexed: list[OldSocket] | None = None
        self._old_index: dict[tuple[str, int, str, int], OldSocket] = {}
        self._old_ports: set[int] = set()
        self.old_checked_ns = 0
        self.lock = threading.Lock()  # the old sockets: the metrics thread reads them too
        # OLDEST is read (live table, metrics): the old sockets are checked every second
        self.oldest_read = oldest_wanted
        # at exit: every socket still past its threshold, oldest first
        self.still: list[Event] = []

    def use_owners(self, owners: Owners) -> None:
        """Share the owners stage's start-up snapshot and look-ups."""
        self.snapshot = lambda: owners.snapshot
        self.enrich = owners.on_events

    def on_start(self) -> None:
        self.started_ns = time.monotonic_ns()
        self.next_scan_ns = self.started_ns + self.interval_ns
        if self.snapshot is None:
            # its own snapshot, now, before tracing is said to have begun (the owners'
            # one, when there is one, is taken by that stage's on_start, after this)
            with self.lock:
                self._take_old()
            self.old_checked_ns = time.monotonic_ns()

    def on_events(self, events: list[Event]) -> None:
        """A socket older than tracing that moves is in the kernel's map from then on:
        it leaves the old list at once, not at the next check (counted twice until then)."""
        old = self.old
        if not old:
            return
        if self._indexed is not old:
            self._old_index = {o.row.entry.key: o for o in old}
            self._old_ports = {o.row.entry.local_port for o in old}
            self._indexed = old
        ports = self._old_ports
        moved = [ev for ev in events if ev[_SPORT] in ports]
        if not moved:
            return
        index = self._old_index
        gone = set()
        for ev in moved:
            o = index.get((ev.local_addr, ev.sport, ev.remote_addr, ev.dport))
            if o is not None and (not ev.netns or ev.netns == o.row.netns):
                gone.add(id(o))
        if gone:
            with self.lock:
                self.old = [o for o in self.old or () if id(o) not in gone]

    def on_tick(self, now_ns: int) -> list[Event] | None:
        if self.old is None:
            with self.lock:
                self._take_old()
            self.old_checked_ns = now_ns
        elif self.old and self.oldest_read and now_ns - self.old_checked_ns >= OLD_RECHECK_S * 1e9:
            # here, not in the metrics thread: sock_diag is this thread's (scrapes only
            # read the list)
            self._recheck(now_ns)
        if now_ns < self.next_scan_ns or not self.stuck_ns:
            return None
        self.next_scan_ns = now_ns + self.interval_ns
        result = self.scanner.scan()
        found = list(result.records) if result is not None else []
        with self.lock:
            found += self._old_crossed(now_ns)
        return found or None

    def on_finish(self, summary: object) -> None:
        if not self.stuck_ns:
            return
        result = self.scanner.scan(SCAN_STUCK)
        still = list(result.records) if result is not None else []
        with self.lock:
            still += self._old_still(time.monotonic_ns())
        if still and self.enrich is not None:
            still = self.enrich(still) or still
        still.sort(key=lambda ev: -ev.delta_ns)
        self.still = still

    def close(self) -> None:
        self.scanner.close()

    def _recheck(self, now_ns: int) -> None:
        """Keep only the old sockets still there, in the same state."""
        alive = {id(o) for o in self._verify(self.old or [])}
        with self.lock:
            self.old = [o for o in self.old or () if id(o) in alive]
            self.old_checked_ns = now_ns

    def oldest(self, verify: bool = False, max_age_s: float = MAX_SCAN_S) -> Oldest:
        """Each state's oldest socket now (for the live table and the metrics).

        The map is walked at most once a MAX_SCAN_S (a walk of a full map costs
        ~15 ms; a live table at 0.1 s would spend 15% of a CPU on it): in between,
        ages are the last walk's entry times against now, and counts the last walk's.
        verify: check the sockets older than tracing first, as often (the main thread
        only: the live table); else they are as of the last check, at most
        OLD_RECHECK_S ago.
        """
        self.oldest_read = True
        now = time.monotonic_ns()
        if verify and self.old and now - self.old_checked_ns >= MAX_SCAN_S * 1e9:
            self._recheck(now)
        result = self.scanner.latest(max_age_s)
        if result is None:
            return Oldest()
        now = max(now, result.now_ns)
        ages = {st: (now - entered, False) for st, entered in result.oldest.items()}
        with self.lock:
            alive = list(self.old or ())
        stuck = dict(result.stuck)
        count = dict(result.count)
        for old in alive:
            state = old.row.entry.state
            count[state] = count.get(state, 0) + 1
            age = now - old.since_ns
            if state not in ages or ages[state][0] < age:
                ages[state] = (age, True)
            if state in self.stuck_ns and age >= self.stuck_ns[state]:
                stuck[state] = stuck.get(state, 0) + 1
        return Oldest(now, ages, count, stuck)

    # Sockets older than tracing ------------------------------------------------

    def _take_old(self) -> None:
        if self.snapshot is not None:
            snap = self.snapshot()
            if snap is None:
                return  # not taken yet
        elif self.tables is not None:
            from tcptrace.sockets import snapshot

            # for OLDEST and NOW only (--stuck has the owners' snapshot): no owners,
            # and no walk of /proc for them
            snap = snapshot.take(self.tables, None, self.filters)
        else:
            snap = None
        rows = snap.rows if snap is not None else []
        since = snap.taken_ns if snap is not None else self.started_ns
        old = [
            OldSocket(row, since)
            for row in rows
            if row.entry.state in STATE_VALUES and not row.entry.timewait
        ]
        if old:
            # the snapshot came after the program attached: a socket born or moved
            # since is in the kernel's map already, and counts there only
            every = self.scanner.scan(SCAN_EVERY)
            mapped = {_key_of(ev) for ev in every.records} if every is not None else set()
            old = [o for o in old if o.row.key not in mapped]
        self.old = old

    def _old_crossed(self, now_ns: int) -> list[Event]:
        due = [
            o
            for o in self.old or ()
            if not o.reported
            and o.row.entry.state in self.stuck_ns
            and now_ns - o.since_ns >= self.stuck_ns[o.row.entry.state]
        ]
        if not due:
            return []
        alive = self._verify(due)
        for o in due:
            o.reported = True  # reported now, or gone: never again either way
        kept = {id(o) for o in alive}
        gone = {id(o) for o in due if id(o) not in kept}
        if gone:
            self.old = [o for o in self.old or () if id(o) not in gone]
        return [self._report(o, now_ns) for o in alive]

    def _old_still(self, now_ns: int) -> list[Event]:
        watched = [
            o
            for o in self.old or ()
            if o.row.entry.state in self.stuck_ns
            and now_ns - o.since_ns >= self.stuck_ns[o.row.entry.state]
        ]
        return [self._report(o, now_ns) for o in self._verify(watched)]

    def _verify(self, sockets: list[OldSocket]) -> list[OldSocket]:
        """Those still there, in the same state (one sock_diag dump per namespace)."""
        if not sockets or self.tables is None:
            return []
        by_netns: dict[int, list[OldSocket]] = {}
        for o in sockets:
            by_netns.setdefault(o.row.netns, []).append(o)
        alive: list[OldSocket] = []
        for netns, group in by_netns.items():
            table = self.tables.get(netns)
            if table is None:
                continue  # the namespace has gone, and its sockets with it
            states = {o.row.entry.state for o in group}
            now = {_identity(e) for e in table.dump(states, self.filters)}
            alive += [o for o in group if _identity(o.row.entry) in now]
        return alive

    @staticmethod
    def _report(old: OldSocket, now_ns: int) -> Event:
        e, owner = old.row.entry, old.row.owner
        flags = F_STUCK | F_DELTA_LOWER | F_NETNS_KNOWN
        if owner is not None:
            flags |= F_OWNER_KNOWN
        return make_event(
            (
                now_ns,
                now_ns - old.since_ns,
                0,  # no kernel address: it was never traced
                0,
                owner.pid if owner is not None else 0,
                flags,
                old.row.netns,
                0,
                raw_address(e.family, e.local_addr),
                raw_address(e.family, e.remote_addr),
                e.local_port,
                e.remote_port,
                e.family,
                e.state,
                e.state,
                owner.comm.encode()[:15] if owner is not None else b"",
            )
        )


STATE_VALUES = frozenset(int(s) for s in STUCK_STATES)


# Positions in an Event tuple, for the per-record paths (C-level indexing).
_SPORT = Event._fields.index("sport")
_TS = Event._fields.index("ts_ns")
_FLAGS = Event._fields.index("flags")
_OLD = Event._fields.index("oldstate")
_NEW = Event._fields.index("newstate")
_SKADDR = Event._fields.index("skaddr")


def _key_of(ev: Event) -> tuple[int, str, int, str, int]:
    """A map record's socket as a snapshot row's key (snapshot.SnapshotRow.key)."""
    return (ev.netns, ev.local_addr, ev.sport, ev.remote_addr, ev.dport)


def _identity(entry: SockEntry) -> tuple[int, tuple[str, int, str, int], int]:
    """A socket as sock_diag shows it, in its state: moved on or gone, it differs."""
    return (entry.state, entry.key, entry.inode)


NEVER = 1 << 64  # later than any CLOCK_MONOTONIC time


class CaptureStuck:
    """--stuck on a capture (-r): the sockets that stayed in a state longer than its
    threshold, by capture time, from their transitions in the capture. A socket is
    reported once per visit, stamped when it crossed, with its age then; at the end,
    `still` lists the ones past their threshold when tracing stopped (the END
    record's time; without one, the capture's last transition).
    Sockets with no transition in the capture are not known (live, the start-up
    snapshot finds them). The replay's source splits its batches with it, so that
    reports go in batches of their own, in time order, as the live scan's do."""

    def __init__(self, stuck_ns: dict[int, int]) -> None:
        self.stuck_ns = {s: ns for s, ns in stuck_ns.items() if ns > 0}
        self.sockets: dict[int, Event] = {}  # skaddr -> the transition into its state
        # per state, (when it crosses, skaddr, entry) in crossing order: each state's
        # threshold is fixed, so entries come in that order
        self.due: dict[int, deque[tuple[int, int, Event]]] = {s: deque() for s in self.stuck_ns}
        self.now_ns = 0  # capture time: the latest transition read
        self.next_due = NEVER  # the earliest crossing queued

    def split(self, events: list[Event]) -> list[list[Event]]:
        """The events (in time order) as batches: transitions, and before the first
        transition after each crossing, the reports of the sockets that crossed."""
        sockets, stuck_ns, due = self.sockets, self.stuck_ns, self.due
        batches: list[list[Event]] = []
        start = 0
        for i, ev in enumerate(events):
            ts = ev[_TS]
            if ts >= self.next_due:  # crossings before this transition go before it
                reports = self._crossed(ts)
                if reports:
                    if i > start:
                        batches.append(events[start:i])
                    batches.append(reports)
                    start = i
            if ev[_OLD] == 0:
                continue  # an accept record: no transition
            new = ev[_NEW]
            sk = ev[_SKADDR]
            if new in stuck_ns:
                sockets[sk] = ev
                crossing = ts + stuck_ns[new]
                due[new].append((crossing, sk, ev))
                self.next_due = min(self.next_due, crossing)
            else:
                sockets.pop(sk, None)
        if events:
            self.now_ns = max(self.now_ns, events[-1][_TS])
        if start < len(events):
            batches.append(events[start:] if start else events)
        return batches

    def _crossed(self, now: int) -> list[Event]:
        """Reports of the sockets that crossed their threshold before now and are still
        in that state, stamped when they crossed, in that order."""
        reports = []
        next_due = NEVER
        for queue in self.due.values():
            while queue and queue[0][0] < now:
                crossed, sk, entry = queue.popleft()
                if self.sockets.get(sk) is entry:  # not moved on since
                    reports.append(self._report(entry, crossed))
            if queue:
                next_due = min(next_due, queue[0][0])
        self.next_due = next_due
        reports.sort(key=operator.itemgetter(_TS))
        return reports

    @staticmethod
    def _report(entry: Event, at: int) -> Event:
        state = entry[_NEW]
        return entry._replace(
            ts_ns=at,
            delta_ns=at - entry[_TS],
            oldstate=state,
            flags=(entry[_FLAGS] & (F_OWNER_KNOWN | F_NETNS_KNOWN)) | F_STUCK | F_DELTA_KNOWN,
            jiffies=0,
        )

    def finish(self, end_ns: int) -> list[Event]:
        """Tracing stopped at end_ns (the capture's END): the reports of the sockets
        that crossed since the last transition; `still` is then as of end_ns."""
        if end_ns <= self.now_ns:
            return []
        self.now_ns = end_ns
        return self._crossed(end_ns + 1)

    @property
    def still(self) -> list[Event]:
        """The sockets past their threshold when the capture ends (finish's time, else
        its last transition), oldest first (the live run's list at exit)."""
        now = self.now_ns
        still = [
            self._report(entry, now)
            for entry in self.sockets.values()
            if now - entry[_TS] >= self.stuck_ns[entry[_NEW]]
        ]
        still.sort(key=lambda ev: -ev.delta_ns)
        return still
