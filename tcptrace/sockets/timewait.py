"""TIME_WAIT made visible: follow timewait sockets, which the tracepoint cannot see.

When a socket enters TIME_WAIT, Linux frees it and keeps a small timewait
socket in its place; the tracepoint only reports the full socket's end,
FIN_WAIT2 -> CLOSE (or CLOSING -> CLOSE). For each such event this stage asks
sock_diag whether a timewait socket now holds that 4-tuple:

- it is in TIME_WAIT: the event becomes FIN_WAIT2 -> TIME_WAIT;
- it is still in FIN_WAIT2 (an orphaned socket whose peer has not closed: the
  kernel keeps it as a timewait socket too): the event is held back, because
  the socket has not closed; FIN_WAIT2 -> TIME_WAIT follows when the peer's
  FIN arrives;
- there is none (the timewait table was full, another network namespace): the
  event stays as the kernel reported it.

Followed sockets are polled (one sock_diag dump, filtered in the kernel by
state and by their local ports) every POLL_INTERVAL seconds, and every
FAST_POLL_INTERVAL while one waits in FIN_WAIT2. When one disappears, a
synthetic TIME_WAIT -> CLOSE (or FIN_WAIT2 -> CLOSE) carries the time spent.
A new connection on the same 4-tuple ends a TIME_WAIT at once (the kernel lets
a new SYN, or tcp_tw_reuse, replace it): its first event closes the followed
socket, with an exact time. With --lifetime the kernel sends a connection only as
it ends: its life record's birth closes the followed socket, exactly, when it comes
before the next poll has found the timewait socket gone.
Times come from the socket's own timer when it fits (sock_diag reports when it
expires, and TIME_WAIT lasts a fixed TCP_TIMEWAIT_LEN): exact to a jiffy or two
(4 ms at HZ=250); otherwise the resolution is the poll interval. Synthetic events carry F_POLLED.

The kernel's statistics are corrected in on_finish: the relabelled transitions,
TIME_WAIT as a state of its own, FIN_WAIT2 durations of held-back sockets.
"""

from __future__ import annotations

import operator
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from tcptrace.compat import slotted
from tcptrace.filters import Filters
from tcptrace.kernel.events import C_SEEN, F_DELTA_KNOWN, F_DELTA_LOWER, F_POLLED, Event, Life
from tcptrace.kernel.stats import StateStats, Summary
from tcptrace.sockets.sockdiag import (
    LOCAL,
    REMOTE,
    TIMEWAIT_STATES,
    Budget,
    SockEntry,
    SocketTables,
    port_ranges,
)
from tcptrace.stages import Stage
from tcptrace.states import TcpState

FIN_WAIT2 = int(TcpState.FIN_WAIT2)
CLOSING = int(TcpState.CLOSING)
TIME_WAIT = int(TcpState.TIME_WAIT)
CLOSE = int(TcpState.CLOSE)

NS_PER_MS = 1_000_000
# TCP_TIMEWAIT_LEN (include/net/tcp.h): fixed at 60 s, no sysctl changes it.
TIME_WAIT_LEN_NS = 60_000 * NS_PER_MS
# Seconds between polls while timewait sockets are followed: the documented resolution.
POLL_INTERVAL = 1.0
# Faster while a socket waits in FIN_WAIT2 for its peer, so FIN_WAIT2 -> TIME_WAIT is prompt.
FAST_POLL_INTERVAL = 0.1
# At most this many timewait sockets are followed; more are counted and left as traced.
# A poll parses a row per followed socket (~5 µs each, sockdiag.decode_answer):
# 4096 take about 20 ms, and about 3 MB to keep.
MAX_FOLLOWED = 4096
# How often namespaces that have gone are looked for (a /proc walk: a few ms).
PRUNE_INTERVAL_NS = 1_000_000_000
# Port ranges in one sock_diag request; more take several requests.
MAX_RANGES = 256

# (netns, local address, local port, remote address, remote port): two namespaces
# can hold the same 4-tuple
Key = tuple[int, str, int, str, int]
_ENDS_IN_TIMEWAIT = frozenset({FIN_WAIT2, CLOSING})
# A new socket in these states on a followed 4-tuple means its timewait socket is gone.
_OPENING = frozenset({int(TcpState.SYN_SENT), int(TcpState.SYN_RECV), int(TcpState.ESTABLISHED)})


# Positions in an Event tuple, for the per-event checks (C-level indexing).
_OLD = Event._fields.index("oldstate")
_NEW = Event._fields.index("newstate")
_new_state = operator.itemgetter(_NEW)
_SPORT = Event._fields.index("sport")
_DPORT = Event._fields.index("dport")
_SKADDR = Event._fields.index("skaddr")
_NETNS = Event._fields.index("netns")
_NONE: frozenset[int] = frozenset()


def key_of(ev: Event, own_netns: int = 0) -> Key:
    return (ev.netns or own_netns, ev.local_addr, ev.sport, ev.remote_addr, ev.dport)


@slotted
@dataclass
class Followed:
    template: Event  # addresses, owner and socket of the traced socket
    cookie: int
    state: int  # TIME_WAIT, or FIN_WAIT2 while the peer has not closed
    since_ns: int  # when it entered `state`
    since_flags: int  # F_DELTA_KNOWN or F_DELTA_LOWER for that start, or 0 if unknown
    last_seen_ns: int
    due_ns: int  # when its timer expires, as of the last poll
    # FIN_WAIT2 time the kernel recorded when it saw the full socket go (held back)
    kernel_partial_ns: int | None = None


@dataclass
class Corrections:
    """What on_finish changes in the kernel's summary."""

    transitions: dict[tuple[int, int], int] = field(default_factory=dict)
    # state -> durations to add, and the kernel's durations to take back (aggregated:
    # a long trace follows millions of sockets)
    added: dict[int, StateStats] = field(default_factory=dict)
    removed: dict[int, StateStats] = field(default_factory=dict)
    synthetic: int = 0

    def move(self, old: int, new: int, n: int = 1) -> None:
        self.transitions[(old, new)] = self.transitions.get((old, new), 0) + n

    def add(self, state: int, duration_ns: int) -> None:
        self.added.setdefault(state, StateStats()).add(duration_ns)

    def remove(self, state: int, duration_ns: int) -> None:
        self.removed.setdefault(state, StateStats()).add(duration_ns)

    def copy(self) -> Corrections:
        """A copy another thread can apply while the stage goes on (each dict is copied
        in one C-level step: never "changed size during iteration")."""
        return Corrections(
            transitions=self.transitions.copy(),
            added={state: _copy_stats(st) for state, st in list(self.added.items())},
            removed={state: _copy_stats(st) for state, st in list(self.removed.items())},
            synthetic=self.synthetic,
        )

    def apply_to(self, summary: Summary) -> None:
        """Change the kernel's summary as the relabelled and followed transitions say."""
        for key, n in self.transitions.items():
            total = summary.transitions.get(key, 0) + n
            if total > 0:
                summary.transitions[key] = total
            else:
                summary.transitions.pop(key, None)
        for state, taken in self.removed.items():
            _remove(summary.state(state), taken)
        for state, added in self.added.items():
            summary.state(state).merge(added)
        summary.counters[C_SEEN] += self.synthetic


class TimeWait(Stage):
    def __init__(
        self,
        filters: Filters,
        tables: SocketTables,
        budget: Budget | None = None,
        poll_interval: float = POLL_INTERVAL,
        lives: Mapping[tuple[int, int], Life] | None = None,
    ) -> None:
        self.filters = filters
        # --lifetime: the kernel's life records of the batch (loader.Probe.lives), whose
        # births are the openings that end a TIME_WAIT on their 4-tuple
        self.lives = lives
        self.tables = tables
        self.budget = budget or Budget()
        self.poll_interval = poll_interval
        self.followed: dict[Key, Followed] = {}
        # (local port, remote port) of every followed socket and maybe a few gone
        # since the last poll: a cheap test before an event's 4-tuple is looked up
        self.port_pairs: set[tuple[int, int]] = set()
        self.last_poll_ns = 0
        self.fixes = Corrections()
        self.unfollowed = 0  # candidates not checked (limit or budget)
        self.asked_ns = 0  # when the last look-up was sent
        self.polls = 0
        # followed sockets dropped because their namespace went away
        self.dropped_with_netns = 0
        self.own = tables.own
        self.pruned_ns = 0

    # ------------------------------------------------------------ events

    def on_events(self, events: list[Event]) -> list[Event] | None:
        # one C-level pass tells whether the batch needs the per-event loop at all
        news = set(map(_new_state, events))
        opening = _OPENING if self.followed and not news.isdisjoint(_OPENING) else _NONE
        lives = self.lives if self.followed and self.lives else None
        # candidates: the full socket's end that may hide a new timewait socket
        candidates = [ev for ev in events if ev[_NEW] == CLOSE and ev[_OLD] in _ENDS_IN_TIMEWAIT]
        if candidates:
            candidates = self._may_wait(candidates)
        found = self._look_up(candidates) if candidates else None
        if found is None:
            self.unfollowed += len(candidates)
        if not found:
            # no timewait socket behind these ends: the kernel's events stand
            return self._reused(events, lives) if opening or lives else None
        out: list[Event] = []
        keep = out.append
        for ev in events:
            new = ev[_NEW]
            if new in opening and (ev[_SPORT], ev[_DPORT]) in self.port_pairs:
                self._end_if_reused(out, ev)
            elif lives is not None and (ev[_SPORT], ev[_DPORT]) in self.port_pairs:
                self._end_if_reborn(out, ev, lives)
            if new != CLOSE or ev[_OLD] not in _ENDS_IN_TIMEWAIT:
                keep(ev)
                continue
            key = key_of(ev, self.own)
            entry = found.get(key)
            if entry is None:
                self._keep(out, ev)
                continue
            self._replace_previous(out, key, entry, ev.ts_ns)
            if entry.state == TIME_WAIT:
                new_ev = ev._replace(newstate=TIME_WAIT)
                self.fixes.move(ev.oldstate, CLOSE, -1)
                self.fixes.move(ev.oldstate, TIME_WAIT)
                self._follow(key, new_ev, entry, TIME_WAIT, ev.ts_ns, F_DELTA_KNOWN)
                self._keep(out, new_ev)
            else:
                # still FIN_WAIT2, now as a timewait socket: not closed, hold the event
                self.fixes.move(ev.oldstate, CLOSE, -1)
                since, flags = _start_of(ev)
                f = self._follow(key, ev, entry, FIN_WAIT2, since, flags)
                if ev.delta_known:
                    f.kernel_partial_ns = ev.delta_ns
                    self.fixes.remove(FIN_WAIT2, ev.delta_ns)
        return out

    def _reused(
        self, events: list[Event], lives: Mapping[tuple[int, int], Life] | None = None
    ) -> list[Event]:
        out: list[Event] = []
        keep = out.append
        pairs = self.port_pairs
        for ev in events:
            if (ev[_SPORT], ev[_DPORT]) in pairs:
                if ev[_NEW] in _OPENING:
                    self._end_if_reused(out, ev)
                elif lives is not None:
                    self._end_if_reborn(out, ev, lives)
            keep(ev)
        return out

    def _end_if_reborn(
        self, out: list[Event], ev: Event, lives: Mapping[tuple[int, int], Life]
    ) -> None:
        """A connection's end from its life record: its birth was an opening."""
        record = lives.get((ev[_SKADDR], ev[0]))
        if record is not None and record.birth_ns:
            self._end_if_reused(out, ev._replace(ts_ns=record.birth_ns))

    def _end_if_reused(self, out: list[Event], ev: Event) -> None:
        """A new connection on a followed 4-tuple: the kernel ended that TIME_WAIT for it

        (a SYN the timewait socket accepted, or tcp_tw_reuse for a connect()).
        """
        key = key_of(ev, self.own)
        f = self.followed.get(key)
        if f is None or ev.ts_ns < f.since_ns:
            return  # not followed, or an opening from before this TIME_WAIT began
        del self.followed[key]
        if f.state == FIN_WAIT2:
            # only a TIME_WAIT socket gives way to a new connection (a FIN_WAIT2 one
            # answers with a reset): the peer's FIN came after our last poll
            at = _clamp(f.last_seen_ns, f.since_ns, ev.ts_ns)
            self._keep(out, self._entered_time_wait_at(f, at))
        self._keep(out, self._closed(f, max(ev.ts_ns, f.since_ns), polled=False))

    def _keep(self, out: list[Event], ev: Event) -> None:
        if not self.filters.states or self.filters.shows(ev.oldstate, ev.newstate):
            out.append(ev)

    def _may_wait(self, candidates: list[Event]) -> list[Event]:
        """The candidates whose namespace can make timewait sockets: where
        tcp_max_tw_buckets is 0 the kernel's FIN_WAIT2 -> CLOSE is the whole truth."""
        # (a namespace whose table is not open yet is asked: the look-up opens it)
        makes = self.tables.makes_timewait
        barred = {netns for netns in {ev[_NETNS] for ev in candidates} if not makes(netns)}
        return [ev for ev in candidates if ev[_NETNS] not in barred] if barred else candidates

    def _look_up(self, candidates: list[Event]) -> dict[Key, SockEntry] | None:
        """Timewait sockets for these 4-tuples, or None when we cannot afford to ask."""
        if len(self.followed) + len(candidates) > MAX_FOLLOWED or not self.budget.allows():
            return None
        started = time.monotonic()
        self.asked_ns = time.monotonic_ns()
        try:
            found, _unreachable = self._dump([key_of(ev, self.own) for ev in candidates])
        finally:
            self.budget.charge(started)
        return found

    def _dump(self, keys: list[Key]) -> tuple[dict[Key, SockEntry], set[int]]:
        """The timewait sockets of these 4-tuples (and a few more), from sock_diag in
        each one's namespace; and the namespaces that cannot be asked any more.

        Each 4-tuple is asked for by its own port: the local one, unless other
        4-tuples share it (the server's port when the server closed first), then
        the remote one. Filtering in the kernel keeps the rows, each of which costs
        ~5 µs to parse, near one per 4-tuple even when thousands of timewait
        sockets share the server's port.
        """
        by_netns: dict[int, list[Key]] = {}
        for key in keys:
            by_netns.setdefault(key[0], []).append(key)
        found: dict[Key, SockEntry] = {}
        unreachable: set[int] = set()
        for netns, ns_keys in by_netns.items():
            table = self.tables.get(netns)
            if table is None:
                unreachable.add(netns)
                continue
            shared = Counter(key[2] for key in ns_keys)
            local = {key[2] for key in ns_keys if shared[key[2]] == 1}
            remote = {key[4] for key in ns_keys if shared[key[2]] > 1}
            for side, ports in ((LOCAL, local), (REMOTE, remote)):
                ranges = port_ranges(ports)
                for start in range(0, len(ranges), MAX_RANGES):
                    clause = [(side, r) for r in ranges[start : start + MAX_RANGES]]
                    for row in table.dump(TIMEWAIT_STATES, self.filters, [clause]):
                        if row.timewait:
                            found[(netns, *row.key)] = row
        return found, unreachable

    def _follow(
        self, key: Key, template: Event, entry: SockEntry, state: int, since: int, flags: int
    ) -> Followed:
        # timer arithmetic uses the moment the kernel was asked, not the parse's end
        asked = self.asked_ns
        f = Followed(
            template=template,
            cookie=entry.cookie,
            state=state,
            since_ns=since,
            since_flags=flags,
            last_seen_ns=asked,
            due_ns=asked + entry.expires_ms * NS_PER_MS,
        )
        self.followed[key] = f
        self.port_pairs.add((entry.local_port, entry.remote_port))
        return f

    def _replace_previous(self, out: list[Event], key: Key, entry: SockEntry, ts: int) -> None:
        """A new timewait socket on a followed 4-tuple: the old one has gone."""
        old = self.followed.get(key)
        if old is not None and old.cookie != entry.cookie:
            del self.followed[key]
            self._keep(out, self._closed(old, min(ts, max(old.due_ns, old.last_seen_ns))))

    # ------------------------------------------------------------ polling

    def on_tick(self, now_ns: int) -> list[Event] | None:
        if len(self.tables.tables) > 1 and now_ns - self.pruned_ns >= PRUNE_INTERVAL_NS:
            # let go of namespaces that have gone (a held socket keeps one alive)
            self.pruned_ns = now_ns
            gone = set(self.tables.prune())
            if gone:
                self._drop_followed(gone)
        if not self.followed:
            return None
        waiting = any(f.state == FIN_WAIT2 for f in self.followed.values())
        interval = min(self.poll_interval, FAST_POLL_INTERVAL) if waiting else self.poll_interval
        if now_ns - self.last_poll_ns < interval * 1e9 or not self.budget.allows():
            return None
        return self.poll()

    def poll(self) -> list[Event]:
        """One sock_diag dump of the followed sockets; events for what changed."""
        started = time.monotonic()
        asked = time.monotonic_ns()
        try:
            seen, unreachable = self._dump(list(self.followed))
        finally:
            self.budget.charge(started)
        # the kernel looked at its table between `asked` and `now`
        now = time.monotonic_ns()
        self.last_poll_ns = asked
        self.polls += 1
        if unreachable:
            self._drop_followed(unreachable)
        made: list[Event] = []
        for key, f in list(self.followed.items()):
            entry = seen.get(key)
            if entry is not None and entry.cookie == f.cookie:
                if f.state == FIN_WAIT2 and entry.state == TIME_WAIT:
                    made.append(self._entered_time_wait(f, entry, asked))
                f.last_seen_ns = asked
                f.due_ns = asked + entry.expires_ms * NS_PER_MS
            else:
                del self.followed[key]
                made.append(self._closed(f, _clamp(f.due_ns, f.last_seen_ns, now)))
        self.port_pairs = {(key[2], key[4]) for key in self.followed}
        made.sort(key=lambda ev: ev.ts_ns)
        return [
            ev
            for ev in made
            if not self.filters.states or self.filters.shows(ev.oldstate, ev.newstate)
        ]

    def _drop_followed(self, namespaces: set[int]) -> None:
        """Forget, quietly, the sockets of namespaces that have gone: their end is unknown."""
        for key in [k for k in self.followed if k[0] in namespaces]:
            del self.followed[key]
            self.dropped_with_netns += 1

    def _entered_time_wait(self, f: Followed, entry: SockEntry, now: int) -> Event:
        # the TIME_WAIT timer was armed for TCP_TIMEWAIT_LEN when the peer's FIN came
        at = _clamp(now + entry.expires_ms * NS_PER_MS - TIME_WAIT_LEN_NS, f.last_seen_ns, now)
        return self._entered_time_wait_at(f, at)

    def _entered_time_wait_at(self, f: Followed, at: int) -> Event:
        ev = self._synthetic(f, at, FIN_WAIT2, TIME_WAIT)
        if f.kernel_partial_ns is not None and ev.delta_known:
            self.fixes.add(FIN_WAIT2, ev.delta_ns)
        self.fixes.move(FIN_WAIT2, TIME_WAIT)
        f.state, f.since_ns, f.since_flags = TIME_WAIT, at, F_DELTA_KNOWN
        return ev

    def _closed(self, f: Followed, at: int, polled: bool = True) -> Event:
        ev = self._synthetic(f, at, f.state, CLOSE, polled)
        self.fixes.move(f.state, CLOSE)
        if f.state == TIME_WAIT:
            self.fixes.synthetic += 1
            if ev.delta_known:
                self.fixes.add(TIME_WAIT, ev.delta_ns)
        elif f.kernel_partial_ns is not None and ev.delta_known:
            self.fixes.add(FIN_WAIT2, ev.delta_ns)
        return ev

    def _synthetic(self, f: Followed, at: int, old: int, new: int, polled: bool = True) -> Event:
        keep = f.template.flags & ~(F_DELTA_KNOWN | F_DELTA_LOWER | F_POLLED)
        return f.template._replace(
            ts_ns=at,
            delta_ns=max(0, at - f.since_ns) if f.since_flags else 0,
            oldstate=old,
            newstate=new,
            flags=keep | f.since_flags | (F_POLLED if polled else 0),
        )

    # ------------------------------------------------------------ summary

    def corrections(self) -> Corrections:
        """What on_finish would change in a summary taken now (read-only, any thread):
        live readers (--metrics) count TIME_WAIT as the exit summary does."""
        return self.fixes.copy()

    def on_finish(self, summary: Summary) -> None:
        self.fixes.apply_to(summary)
        # their kernel FIN_WAIT2 -> CLOSE was traced but not shown: they have not closed
        summary.held = sum(1 for f in self.followed.values() if f.state == FIN_WAIT2)
        if self.dropped_with_netns:
            summary.notes.append(
                f"TIME_WAIT: {self.dropped_with_netns} followed sockets dropped with their "
                "network namespace (it was deleted: their end is not known)"
            )
        if self.unfollowed:
            summary.notes.append(
                f"TIME_WAIT: {self.unfollowed} closing sockets not followed "
                f"(over {MAX_FOLLOWED} followed, or sock_diag budget spent)"
            )


def _start_of(ev: Event) -> tuple[int, int]:
    """When the event's socket entered the state it leaves, and how well that is known."""
    if ev.delta_known:
        return ev.ts_ns - ev.delta_ns, F_DELTA_KNOWN
    if ev.delta_lower:
        return ev.ts_ns - ev.delta_ns, F_DELTA_LOWER
    return ev.ts_ns, 0


def _clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(value, hi))


def _copy_stats(stats: StateStats) -> StateStats:
    return StateStats(stats.count, stats.total_ns, stats.max_ns, list(stats.hist), stats.unknown)


def _remove(stats: StateStats, taken: StateStats) -> None:
    """Take back durations the kernel recorded (its max cannot be undone: a later add covers it)."""
    for slot, n in enumerate(taken.hist):
        n = min(n, stats.hist[slot])
        if n:
            stats.hist[slot] -= n
            stats.count -= n
    stats.total_ns = max(0, stats.total_ns - taken.total_ns)
