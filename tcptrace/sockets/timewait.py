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

import heapq
import operator
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace

from tcptrace.compat import slotted
from tcptrace.filters import Filters
from tcptrace.kernel.events import (
    C_SEEN,
    F_DELTA_KNOWN,
    F_DELTA_LOWER,
    F_END_UNSURE,
    F_POLLED,
    F_TW,
    F_TW_KNOWN,
    F_TW_PEER_FIN,
    Event,
    Life,
)
from tcptrace.kernel.stats import StateStats, Summary
from tcptrace.sockets.sockdiag import (
    LOCAL,
    REMOTE,
    TIMEWAIT_STATES,
    Budget,
    SockEntry,
    SocketTable,
    SocketTables,
    port_ranges,
)
from tcptrace.sockets.wheel import MIN_SPAN_NS, TimerWheel, sample_jiffies
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
# At most this many timewait sockets are followed; more are counted and left as traced:
# 60 s of 5,000 new ones a second, and room (about 0.6 KB each to keep).
MAX_FOLLOWED = 400_000
# New timewait sockets followed a second at most (a second's worth may come at once);
# beyond, their ends stay as traced, counted as not followed. Following costs the
# reader ~10 µs an end, and every reuse of a followed 4-tuple a TIME_WAIT -> CLOSE line:
# at 19,000 connections a second, following them all cost 15-30% more CPU and lost
# events; at this rate BENCHMARKS.md "TIME_WAIT followed" follows every one.
MAX_FOLLOW_RATE = 6_000
# Up to this many followed, a poll asks for every one (a row each, ~5 µs to parse:
# about 20 ms), so that one a reset killed early is seen go. Beyond, it asks only for
# those still in FIN_WAIT2; each in TIME_WAIT ends at its timer (exact to a jiffy)
# or when a new connection takes its 4-tuple (exact), which the events tell.
POLL_ALL = 4096
# Beyond POLL_ALL, each poll also asks for this many followed sockets in TIME_WAIT in
# turn (a band of ports: one request, ~5 µs a row), so that one a reset killed is seen
# go within a round (followed / ROTATION polls), while no more than ROTATE_MAX are
# followed (a round within 30 s); beyond, a TIME_WAIT ends at its timer or its reuse.
ROTATION = 2048
ROTATE_MAX = 60_000
# Past its timer by this much, a timewait socket not asked for is closed at its timer
# (a new connection that took its 4-tuple sooner comes in the events before then).
DUE_GRACE_NS = 1_000_000_000
# Followed sockets are kept in about the order their timers fall due (they are
# entered as they are seen); the walk for due ones stops this far past now.
DUE_ORDER_SLACK_NS = 2_000_000_000
# The kernel's word on timewait sockets (events.F_TW_KNOWN) is checked against
# sock_diag's on the first this many it gives before it is trusted.
VERIFY_AGREED = 8
# How often namespaces that have gone are looked for (a /proc walk: a few ms).
PRUNE_INTERVAL_NS = 1_000_000_000
# Up to this many sockets are looked up one by one, more in one dump (its kernel walk
# costs about as much as this many look-ups).
EXACT_LOOK_UPS = 8
# A dump that resumes by index within a hash bucket skips a row when another row of the
# bucket goes meanwhile: a followed socket missing from a poll before its timer is due
# is looked up alone before it is called closed, up to this many a poll (the rest wait
# for the next poll).
MAX_CONFIRMS = 32
# Beyond POLL_ALL, the (port, port) pairs of followed sockets are rebuilt (dropping
# those gone) once in this many polls, not at each.
PAIRS_REBUILD = 16
# Lines learnt by polling wait for the events read to reach their time; with no event
# for this long, the reader has read everything older than that.
IDLE_RELEASE_NS = 200_000_000
IDLE_TICKS = 2
# Reads of /proc/timer_list until the timer wheel's HZ is known (events tell it too).
WHEEL_SAMPLES = 5
# Port ranges in one sock_diag request; more take several requests.
MAX_RANGES = 256

# (netns, local address, local port, remote address, remote port): two namespaces
# can hold the same 4-tuple
Key = tuple[int, str, int, str, int]
_ENDS_IN_TIMEWAIT = frozenset({FIN_WAIT2, CLOSING})
# The program's word: a timewait socket took its place, in TIME_WAIT already.
_AT_PEER_FIN = F_TW_KNOWN | F_TW | F_TW_PEER_FIN
# A new socket in these states on a followed 4-tuple means its timewait socket is gone.
_OPENING = frozenset({int(TcpState.SYN_SENT), int(TcpState.SYN_RECV), int(TcpState.ESTABLISHED)})


# Positions in an Event tuple, for the per-event checks (C-level indexing).
_OLD = Event._fields.index("oldstate")
_NEW = Event._fields.index("newstate")
_new_state = operator.itemgetter(_NEW)
_event_time = operator.itemgetter(0)
_SPORT = Event._fields.index("sport")
_DPORT = Event._fields.index("dport")
_SKADDR = Event._fields.index("skaddr")
_NETNS = Event._fields.index("netns")
_FAMILY = Event._fields.index("family")
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
        lives: MutableMapping[tuple[int, int], Life] | None = None,
        behind: Callable[[], bool] | None = None,
    ) -> None:
        self.filters = filters
        # whether the event reader has fallen behind the kernel (loader.Probe.behind)
        self.behind = behind
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
        self.behind_count = 0  # of which because the reader was behind
        self.over_rate = 0  # of which beyond MAX_FOLLOW_RATE
        self.follow_tokens = float(MAX_FOLLOW_RATE)
        self.tokens_ns = time.monotonic_ns()
        self.asked_ns = 0  # when the last look-up was sent
        # when the request that found each row of the last look-up left: a timer is
        # read against its own request (one by one, the 8th leaves ~25 ms after the
        # first under emulation: read against the first, TIME_WAIT began that early)
        self.read_at: dict[Key, int] = {}
        self.polls = 0
        # followed sockets dropped because their namespace went away, and who else
        # must forget them (--lifetime: the connections waiting for their end)
        self.dropped_with_netns = 0
        self.on_dropped: Callable[[list[Key]], None] | None = None
        self.own = tables.own
        self.pruned_ns = 0
        # followed sockets still in FIN_WAIT2 (waiting for their peer's FIN)
        self.waiting: set[Key] = set()
        # TIME_WAITs a poll found gone, and when (at the latest): their end is told once
        # the events read reach that time, unless an opening read by then on their
        # 4-tuple (a reader behind) says exactly when a new connection took it
        self.gone: dict[Key, tuple[Followed, int]] = {}
        # beyond POLL_ALL: the followed sockets in TIME_WAIT still to ask for this round
        self.turn: deque[Key] = deque()
        # the program's word on timewait sockets at each end (events.F_TW_KNOWN):
        # None while it is checked against sock_diag, then trusted or not
        self.kernel_trusted: bool | None = None
        self.kernel_agreed = 0
        self.kernel_problem: str | None = None
        # when the timer wheel runs a TIME_WAIT's timer, learnt from the events' jiffies
        self.wheel = TimerWheel()
        self.wheel_sampled_ns = 0
        self.wheel_samples = 0  # timer list reads (a few, until HZ is known)
        # lines learnt by polling, held until the events read reach their time, so
        # that they come in time order with the kernel's (sorted by time)
        self.held_lines: list[Event] = []
        self.read_upto_ns = 0  # the newest event time read
        self.last_batch_ns = 0  # when the last batch of events came (monotonic)
        self.empty_ticks = 0  # ticks since then: each after a read that found nothing

    # ------------------------------------------------------------ events

    def on_events(self, events: list[Event]) -> list[Event] | None:
        out = self._on_events(events)
        if events:
            # batches come in time order (the reader's frontier): what is older than
            # this one's newest has all been read
            self.read_upto_ns = max(self.read_upto_ns, max(map(_event_time, events)))
            self.last_batch_ns = time.monotonic_ns()
            self.empty_ticks = 0
        if not self.held_lines and not self.gone:
            return out
        ready = self._release(self.read_upto_ns)
        if not ready:
            return out
        return list(heapq.merge(events if out is None else out, ready, key=_event_time))

    def _gone_upto(self, upto_ns: int) -> list[Event]:
        """The ends of the TIME_WAITs found gone no later than upto_ns, told now."""
        lines = []
        for key, (f, at) in list(self.gone.items()):
            if at <= upto_ns:
                del self.gone[key]
                self._keep(lines, self._closed(f, at))
        return lines

    def _release(self, upto_ns: int) -> list[Event]:
        """The lines learnt by polling whose time the events read have reached."""
        if self.gone:
            gone = self._gone_upto(upto_ns)
            if gone:
                self.held_lines = sorted(self.held_lines + gone, key=_event_time)
        held = self.held_lines
        n = 0
        while n < len(held) and held[n].ts_ns <= upto_ns:
            n += 1
        ready, self.held_lines = held[:n], held[n:]
        return ready

    def _on_events(self, events: list[Event]) -> list[Event] | None:
        # one C-level pass tells whether the batch needs the per-event loop at all
        news = set(map(_new_state, events))
        # candidates: the full socket's end that may hide a new timewait socket
        candidates = [ev for ev in events if ev[_NEW] == CLOSE and ev[_OLD] in _ENDS_IN_TIMEWAIT]
        if candidates:
            # where no timewait socket can be made, the kernel's end is the whole truth:
            # not a candidate, not counted against the limits below
            candidates = self._may_wait(candidates)
        # a new connection may end a TIME_WAIT followed before, or one begun in this batch
        follows = bool(self.followed or candidates)
        opening = _OPENING if follows and not news.isdisjoint(_OPENING) else _NONE
        lives = self.lives if follows and self.lives else None
        told: list[Event] = []
        if candidates and self.behind is not None and self.behind():
            # the reader is behind (its rings fill): following (~30% of its time at
            # 19,000 connections a second) gives way to the events themselves, whose
            # loss would be worse; these ends stay as traced, counted
            self.unfollowed += len(candidates)
            self.behind_count += len(candidates)
            events = _unsure(events, candidates)
            candidates = []
            marked = True
        else:
            marked = False
        if candidates:
            now = time.monotonic_ns()
            self.follow_tokens = min(
                MAX_FOLLOW_RATE,
                self.follow_tokens + (now - self.tokens_ns) * MAX_FOLLOW_RATE / 1e9,
            )
            self.tokens_ns = now
            if len(candidates) > self.follow_tokens:
                n = int(self.follow_tokens)
                over = candidates[n:]
                self.unfollowed += len(over)
                self.over_rate += len(over)
                events = _unsure(events, over)
                candidates = candidates[:n]
                marked = True
            self.follow_tokens -= len(candidates)
        if candidates and self.kernel_trusted:
            # the program saw whether a timewait socket took each one's place: no asking
            told = [ev for ev in candidates if ev.flags & F_TW_KNOWN]
            if told:
                candidates = [ev for ev in candidates if not ev.flags & F_TW_KNOWN]
        found = self._look_up(candidates) if candidates else None
        if found is None and candidates:
            self.unfollowed += len(candidates)
            events = _unsure(events, candidates)
        elif candidates and not news.isdisjoint(_OPENING):
            late = self._reused_before_asked(events, candidates)
            if late:
                # what sock_diag holds on their 4-tuple now is a later connection's
                self.unfollowed += len(late)
                events = _unsure(events, late)
        if told and not news.isdisjoint(_OPENING):
            # an orphan's timewait socket in FIN_WAIT2 whose 4-tuple a new connection
            # took in the same batch: whether the peer's FIN came first, nothing tells
            late = self._reused_before_asked(
                events, [ev for ev in told if ev.flags & F_TW and not ev.flags & F_TW_PEER_FIN]
            )
            if late:
                self.unfollowed += len(late)
                events = _unsure(events, late)
        if told:
            found = found or {}
        if not found and not told:
            # no timewait socket behind these ends: the kernel's events stand
            if opening or lives:
                return self._reused(events, lives)
            return events if (found is None and candidates) or marked else None
        out: list[Event] = []
        keep = out.append
        moved: list[Event] = []  # TIME_WAIT entries stamped later than the kernel's event
        for ev in events:
            new = ev[_NEW]
            if new in opening and (ev[_SPORT], ev[_DPORT]) in self.port_pairs:
                self._end_if_reused(out, ev)
            elif lives is not None and (ev[_SPORT], ev[_DPORT]) in self.port_pairs:
                self._end_if_reborn(out, ev, lives)
            if new != CLOSE or ev[_OLD] not in _ENDS_IN_TIMEWAIT or ev.flags & F_END_UNSURE:
                keep(ev)
                continue
            key = key_of(ev, self.own)
            if ev.flags & F_TW_KNOWN and self.kernel_trusted:
                self._told(out, key, ev)
                continue
            entry = found.get(key)
            if ev.flags & F_TW_KNOWN and self.kernel_trusted is None:
                self._check_kernel(ev, entry)
            if entry is None:
                self._keep(out, ev)
                continue
            self._replace_previous(out, key, entry, ev.ts_ns)
            if entry.state == TIME_WAIT:
                new_ev = self._time_wait_since(ev, entry, self._read(key))
                self.fixes.move(ev.oldstate, CLOSE, -1)
                self.fixes.move(ev.oldstate, TIME_WAIT)
                self._follow(key, new_ev, entry, TIME_WAIT, new_ev.ts_ns, F_DELTA_KNOWN)
                self._keep(out if new_ev.ts_ns == ev.ts_ns else moved, new_ev)
            else:
                # still FIN_WAIT2, now as a timewait socket: not closed, hold the event
                self.fixes.move(ev.oldstate, CLOSE, -1)
                since, flags = _start_of(ev)
                f = self._follow(key, ev, entry, FIN_WAIT2, since, flags)
                if ev.delta_known:
                    f.kernel_partial_ns = ev.delta_ns
                    self.fixes.remove(FIN_WAIT2, ev.delta_ns)
        if moved:
            if self.lives is None:
                # later than events still to be read, maybe (a reader behind): held as
                # the lines polling learns, until the events read reach their time
                self.held_lines = sorted(self.held_lines + moved, key=_event_time)
            else:
                # --lifetime: the life record of this batch is found by its closing event
                out = sorted(out + moved, key=_event_time)
        return out

    def _told(self, out: list[Event], key: Key, ev: Event) -> None:
        """An end the program saw: no timewait socket (its event stands), one in
        TIME_WAIT since this very event, or an orphan's in FIN_WAIT2 (held back)."""
        if not ev.flags & F_TW:
            self._keep(out, ev)
            return
        self.wheel.note(ev.ts_ns, ev.jiffies)
        old = self.followed.get(key)
        if old is not None:
            # a new timewait socket on the 4-tuple: the one followed there had gone by
            # this event (a poll since, by a reader behind, saw the new one)
            self._forget(key)
            ended = min(ev.ts_ns, max(self._fires(old), old.last_seen_ns))
            self._keep(out, self._closed(old, ended))
        if len(self.followed) >= MAX_FOLLOWED:
            self.unfollowed += 1
            self._keep(out, ev._replace(flags=ev.flags | F_END_UNSURE))
            return
        self.fixes.move(ev.oldstate, CLOSE, -1)
        due = ev.ts_ns + TIME_WAIT_LEN_NS
        if ev.flags & F_TW_PEER_FIN:
            self.fixes.move(ev.oldstate, TIME_WAIT)
            new_ev = ev._replace(newstate=TIME_WAIT)
            self._track(key, new_ev, 0, TIME_WAIT, ev.ts_ns, F_DELTA_KNOWN, ev.ts_ns, due)
            self._keep(out, new_ev)
            return
        since, flags = _start_of(ev)
        # its timer is at most TIME_WAIT_LEN away (tcp_fin_time): the poll says when
        f = self._track(key, ev, 0, FIN_WAIT2, since, flags, ev.ts_ns, due)
        if ev.delta_known:
            f.kernel_partial_ns = ev.delta_ns
            self.fixes.remove(FIN_WAIT2, ev.delta_ns)

    def _check_kernel(self, ev: Event, entry: SockEntry | None) -> None:
        """Compare the program's word on a timewait socket with what sock_diag found."""
        tw = bool(ev.flags & F_TW)
        if entry is None and tw:
            return  # gone already (a reset, a new connection): tells nothing
        peer_fin = bool(ev.flags & F_TW_PEER_FIN)
        if entry is not None and not tw:
            problem = "a timewait socket the kernel did not report"
        elif entry is not None and peer_fin and entry.state != TIME_WAIT:
            problem = "a timewait socket in FIN_WAIT2 the kernel said was in TIME_WAIT"
        else:
            self.kernel_agreed += 1
            if self.kernel_agreed >= VERIFY_AGREED:
                self.kernel_trusted = True
            return
        self.kernel_trusted = False
        self.kernel_problem = f"sock_diag found {problem} (BTF offsets): each end is asked"

    def _read(self, key: Key) -> int:
        """When the kernel was asked for the row of this key in the last look-up."""
        return self.read_at.get(key, self.asked_ns)

    def _time_wait_since(self, ev: Event, entry: SockEntry, asked: int) -> Event:
        """The kernel's FIN_WAIT2 -> CLOSE (CLOSING -> CLOSE) of a socket whose timewait
        socket was found in TIME_WAIT: it went there when the peer's FIN came, which
        may be after the kernel's event (an orphan's timewait socket starts in
        FIN_WAIT2). When, its timer tells: armed for TIME_WAIT_LEN at that moment."""
        if self.kernel_trusted is not False and ev.flags & _AT_PEER_FIN == _AT_PEER_FIN:
            # the program saw it in TIME_WAIT at this very event (and sock_diag agrees,
            # or nothing has contradicted the program yet): no timer to read
            return ev._replace(newstate=TIME_WAIT)
        at = _clamp(asked + entry.expires_ms * NS_PER_MS - TIME_WAIT_LEN_NS, ev.ts_ns, asked)
        if at - ev.ts_ns <= self.wheel.tick_ns() + NS_PER_MS:
            # the timer, in jiffies and read in ms, cannot tell a FIN within a jiffy of
            # the event from one at it: the kernel's end is the time (a non-orphan's
            # FIN_WAIT2 ends in TIME_WAIT at that very event), not up to a jiffy later
            return ev._replace(newstate=TIME_WAIT)
        later = at - ev.ts_ns
        if self.lives is not None:
            # --lifetime: its life record is found by its closing event's time
            record = self.lives.pop((ev[_SKADDR], ev.ts_ns), None)
            if record is not None:
                self.lives[(ev[_SKADDR], at)] = record
        if ev.delta_known:  # the kernel timed the state to its event: to the FIN now
            self.fixes.remove(ev.oldstate, ev.delta_ns)
            self.fixes.add(ev.oldstate, ev.delta_ns + later)
        return ev._replace(
            newstate=TIME_WAIT, ts_ns=at, delta_ns=ev.delta_ns + later, flags=ev.flags | F_POLLED
        )

    def _reused_before_asked(self, events: list[Event], candidates: list[Event]) -> list[Event]:
        """The ends whose 4-tuple a new connection took before sock_diag was asked (a
        reader far behind): their timewait socket, if there was one, went with it, and
        what sock_diag finds there now is the new connection's. Nothing can tell what
        became of theirs: their FIN_WAIT2 -> CLOSE stays, marked unsure."""
        ends: dict[Key, list[Event]] = {}
        for ev in candidates:
            ends.setdefault(key_of(ev, self.own), []).append(ev)
        late: list[Event] = []
        for ev in events:
            if ev[_NEW] in _OPENING and ev.ts_ns <= self.asked_ns:
                mine = ends.get(key_of(ev, self.own))
                if mine:
                    # (several connections may have had the 4-tuple in one batch)
                    before = [end for end in mine if end.ts_ns < ev.ts_ns]
                    late.extend(before)
                    mine[:] = [end for end in mine if end.ts_ns >= ev.ts_ns]
        return late

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
        if f is None:
            gone = self.gone.get(key)
            if gone is not None and gone[0].since_ns <= ev.ts_ns <= gone[1]:
                # a poll found it gone; this opening, read since, says when
                del self.gone[key]
                self._keep(out, self._closed(gone[0], ev.ts_ns, polled=False))
            return
        if ev.ts_ns < f.since_ns:
            return  # an opening from before this TIME_WAIT began
        self._forget(key)
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
        try:
            found, _unreachable = self._ask(
                [(key_of(ev, self.own), ev[_FAMILY]) for ev in candidates]
            )
        finally:
            self.budget.charge(started)
        return found

    def _ask(self, keys: list[tuple[Key, int]]) -> tuple[dict[Key, SockEntry], set[int]]:
        """The timewait sockets of these (4-tuple, family)s, from sock_diag in each
        one's namespace; and the namespaces that cannot be asked any more.

        A few are looked up one by one (the kernel's hash look-up, ~0.15 ms each);
        more in a dump, whose kernel walk of the whole established table costs
        ~1-3 ms per family however few sockets it finds.
        """
        by_netns: dict[int, list[tuple[Key, int]]] = {}
        for key, family in keys:
            by_netns.setdefault(key[0], []).append((key, family))
        found: dict[Key, SockEntry] = {}
        # (opening a namespace's table takes long the first time: ~100 ms)
        tables = {netns: self.tables.get(netns) for netns in by_netns}
        unreachable = {netns for netns, table in tables.items() if table is None}
        # timers are read against this: the kernel is asked from now on
        self.asked_ns = time.monotonic_ns()
        first = 0
        self.read_at = read_at = {}
        for netns, ns_keys in by_netns.items():
            table = tables[netns]
            if table is None:
                continue
            if len(ns_keys) <= EXACT_LOOK_UPS:
                for key, family in ns_keys:
                    row = table.find(family, (key[1], key[2]), (key[3], key[4]))
                    sent = self._sent(table)
                    first = first or sent
                    if row is not None and row.timewait and (netns, *row.key) == key:
                        found[key] = row
                        read_at[key] = sent or self.asked_ns
            else:
                for family in {family for _key, family in ns_keys}:
                    got: dict[Key, SockEntry] = {}
                    self._dump(table, netns, [k for k, f in ns_keys if f == family], family, got)
                    sent = self._sent(table)
                    first = first or sent
                    found.update(got)
                    read_at.update(dict.fromkeys(got, sent or self.asked_ns))
        self.asked_ns = first or self.asked_ns
        return found, unreachable

    def _sent(self, table: SocketTable) -> int:
        """When the request just made left (0: not known). A row's timer is read against
        its request's departure (read_at), not against when tcptrace began to build it
        (~10 ms before under emulation): the kernel read it after that."""
        sent = getattr(table, "sent_ns", 0)
        return sent if sent >= self.asked_ns else 0

    def _dump(
        self, table: SocketTable, netns: int, keys: list[Key], family: int, found: dict
    ) -> None:
        """The timewait sockets of these 4-tuples of one family (and a few more), by a
        dump of the namespace's table, into found.

        Each 4-tuple is asked for by its own port: the local one, unless other
        4-tuples share it (the server's port when the server closed first), then
        the remote one. Filtering in the kernel keeps the rows, each of which costs
        ~5 µs to parse, near one per 4-tuple even when thousands of timewait
        sockets share the server's port.
        """
        filters = replace(self.filters, family=family)
        shared = Counter(key[2] for key in keys)
        local = {key[2] for key in keys if shared[key[2]] == 1}
        remote = {key[4] for key in keys if shared[key[2]] > 1}
        for side, ports in ((LOCAL, local), (REMOTE, remote)):
            ranges = port_ranges(ports)
            for start in range(0, len(ranges), MAX_RANGES):
                clause = [(side, r) for r in ranges[start : start + MAX_RANGES]]
                for row in table.dump(TIMEWAIT_STATES, filters, [clause]):
                    if row.timewait:
                        found[(netns, *row.key)] = row

    def _follow(
        self, key: Key, template: Event, entry: SockEntry, state: int, since: int, flags: int
    ) -> Followed:
        # timer arithmetic uses the moment the kernel was asked, not the parse's end
        asked = self._read(key)
        due = asked + entry.expires_ms * NS_PER_MS
        return self._track(key, template, entry.cookie, state, since, flags, asked, due)

    def _track(
        self,
        key: Key,
        template: Event,
        cookie: int,
        state: int,
        since: int,
        flags: int,
        seen: int,
        due: int,
    ) -> Followed:
        """Follow a timewait socket (cookie 0: not known yet, the first poll takes it)."""
        f = Followed(
            template=template,
            cookie=cookie,
            state=state,
            since_ns=since,
            since_flags=flags,
            last_seen_ns=seen,
            due_ns=due,
        )
        self.followed.pop(key, None)  # re-entered last: the walk for due ones is in order
        self.followed[key] = f
        if state == FIN_WAIT2:
            self.waiting.add(key)
        else:
            self.waiting.discard(key)
        self.port_pairs.add((key[2], key[4]))
        return f

    def _forget(self, key: Key) -> None:
        del self.followed[key]
        self.waiting.discard(key)

    def _replace_previous(self, out: list[Event], key: Key, entry: SockEntry, ts: int) -> None:
        """A new timewait socket on a followed 4-tuple: the old one has gone."""
        old = self.followed.get(key)
        if old is not None and old.cookie != entry.cookie:
            self._forget(key)
            self._keep(out, self._closed(old, min(ts, max(self._fires(old), old.last_seen_ns))))

    # ------------------------------------------------------------ polling

    def on_start(self) -> None:
        self._sample_wheel()
        # the first table takes long to open (pyroute2's import and socket: ~0.1 s
        # here, 1.7 s under emulation): now, not at the first end, where it spent
        # the look-up budget's burst and left the next ends unfollowed
        for netns in self.filters.netns or (0,):
            self.tables.get(netns)

    def _sample_wheel(self) -> None:
        """The timer list tells HZ and the jiffies' phase before any event does."""
        pair = sample_jiffies()
        self.wheel_samples += 1
        self.wheel_sampled_ns = time.monotonic_ns()
        if pair is not None:
            self.wheel.note(*pair)

    def on_tick(self, now_ns: int) -> list[Event] | None:
        made = self._poll_if_due(now_ns)
        if made:
            self.held_lines = sorted(self.held_lines + made, key=_event_time)
        self.empty_ticks += 1
        if (
            (self.held_lines or self.gone)
            and self.empty_ticks >= IDLE_TICKS
            and now_ns - self.last_batch_ns >= IDLE_RELEASE_NS
        ):
            # the rings were read and found empty, for a while: every event older than
            # that has been read (a reader that was blocked writing had not)
            return self._release(now_ns - IDLE_RELEASE_NS) or None
        return None

    def _poll_if_due(self, now_ns: int) -> list[Event]:
        """What the namespaces gone and a poll, when one is due, have learnt."""
        if (
            self.wheel.hz is None
            and self.wheel_samples < WHEEL_SAMPLES
            and now_ns - self.wheel_sampled_ns >= MIN_SPAN_NS
        ):
            self._sample_wheel()
        made: list[Event] = []
        if len(self.tables.tables) > 1 and now_ns - self.pruned_ns >= PRUNE_INTERVAL_NS:
            # let go of namespaces that have gone (a held socket keeps one alive)
            self.pruned_ns = now_ns
            gone = set(self.tables.prune())
            if gone:
                made += self._drop_followed(gone)
        if not self.followed:
            return made
        interval = self.poll_interval
        if self.waiting:
            interval = min(interval, FAST_POLL_INTERVAL)
        if now_ns - self.last_poll_ns < interval * 1e9 or not self.budget.allows():
            return made
        return made + self.poll()

    def on_drained(self, now_ns: int) -> list[Event] | None:
        # a reader held back (a stalled pipe) polled little: where did those waiting
        # for their peer's FIN go (the summary counts the rest as held)
        made = self.held_lines + (self.poll() if self.waiting else [])
        made += self._gone_upto(now_ns)
        self.held_lines = []
        return sorted(made, key=_event_time) or None

    def poll(self) -> list[Event]:
        """One sock_diag dump of the followed sockets (beyond POLL_ALL, of those in
        FIN_WAIT2, and of one band of the others in turn, ROTATION at a time; they
        end at their timer); events for what changed."""
        every = len(self.followed) <= POLL_ALL
        asking = self.followed if every else {k: self.followed[k] for k in self.waiting}
        started = time.monotonic()
        try:
            seen, unreachable = self._ask([(key, f.template[_FAMILY]) for key, f in asking.items()])
        finally:
            self.budget.charge(started)
        asked = self.asked_ns
        self.last_poll_ns = asked
        self.polls += 1
        made: list[Event] = []
        if unreachable:
            made += self._drop_followed(unreachable)
        self._take(asking, seen, asked, made)
        if not every:
            band = self._next_band()
            if band:
                started = time.monotonic()
                try:
                    seen, unreachable = self._ask_band(band)
                finally:
                    self.budget.charge(started)
                if unreachable:
                    made += self._drop_followed(unreachable)
                asking = {key: self.followed[key] for key in band if key in self.followed}
                postponed = self._take(asking, seen, self.asked_ns, made)
                self.turn.extendleft(reversed([key for key in band if key in postponed]))
            made.extend(self._timers_out(time.monotonic_ns()))
        if every or not self.polls % PAIRS_REBUILD:
            self.port_pairs = {(key[2], key[4]) for key in (*self.followed, *self.gone)}
        made.sort(key=lambda ev: ev.ts_ns)
        return [
            ev
            for ev in made
            if not self.filters.states or self.filters.shows(ev.oldstate, ev.newstate)
        ]

    def _take(
        self, asking: Mapping[Key, Followed], seen: Mapping[Key, SockEntry], asked: int, made: list
    ) -> set[Key]:
        """What one ask found of these followed sockets, into made: the keys whose
        check was postponed (beyond MAX_CONFIRMS missing)."""
        # the kernel looked at its table between `asked` and `now`
        now = time.monotonic_ns()
        confirmed, postponed = self._confirm_missing(seen, now, asking)
        for key, f in list(asking.items()):
            if key not in self.followed:
                continue  # dropped with its namespace
            if key in postponed:
                continue  # not looked up alone this time: the next poll will
            entry = seen.get(key) or confirmed.get(key)
            if entry is not None and not f.cookie and f.since_ns <= asked:
                f.cookie = entry.cookie  # followed on the kernel's word: now known
            if entry is not None and entry.cookie == f.cookie:
                read = self._read(key)
                if f.state == FIN_WAIT2 and entry.state == TIME_WAIT:
                    made.append(self._entered_time_wait(f, entry, read))
                    self.waiting.discard(key)
                    self.followed[key] = self.followed.pop(key)  # due last: in order
                f.last_seen_ns = read
                f.due_ns = read + entry.expires_ms * NS_PER_MS
            else:
                self._forget(key)
                at = _clamp(self._fires(f), f.last_seen_ns, now)
                if f.state == TIME_WAIT:
                    self.gone[key] = (f, at)
                else:
                    made.append(self._closed(f, at))
        return postponed

    def _next_band(self) -> list[Key]:
        """The next ROTATION followed sockets in TIME_WAIT, in port order (a band of
        ports one request asks for), while no more than ROTATE_MAX are followed."""
        if len(self.followed) > ROTATE_MAX:
            self.turn.clear()
            return []
        if not self.turn:
            waits = [key for key, f in self.followed.items() if f.state == TIME_WAIT]
            self.turn.extend(sorted(waits, key=_band_order))
        band: list[Key] = []
        while self.turn and len(band) < ROTATION:
            key = self.turn.popleft()
            f = self.followed.get(key)
            if f is not None and f.state == TIME_WAIT:
                band.append(key)
        return band

    def _ask_band(self, keys: list[Key]) -> tuple[dict[Key, SockEntry], set[int]]:
        """The timewait sockets of a band of followed 4-tuples: one dump per namespace
        and family, for the range of ports they span (the local port, or the remote one
        where they share it: the server closed first)."""
        groups: dict[tuple[int, int], list[Key]] = {}
        for key in keys:
            groups.setdefault((key[0], self.followed[key].template[_FAMILY]), []).append(key)
        tables = {netns: self.tables.get(netns) for netns, _family in groups}
        unreachable = {netns for netns, table in tables.items() if table is None}
        self.asked_ns = time.monotonic_ns()
        first = 0
        found: dict[Key, SockEntry] = {}
        self.read_at = read_at = {}
        for (netns, family), group in groups.items():
            table = tables[netns]
            if table is None:
                continue
            shared = len({key[2] for key in group}) < len(group)
            side, at = (REMOTE, 4) if shared else (LOCAL, 2)
            band = (min(key[at] for key in group), max(key[at] for key in group))
            filters = replace(self.filters, family=family)
            rows = table.dump(TIMEWAIT_STATES, filters, [[(side, band)]])
            sent = self._sent(table)
            for row in rows:
                if row.timewait:
                    found[(netns, *row.key)] = row
                    read_at[(netns, *row.key)] = sent or self.asked_ns
            first = first or sent
        self.asked_ns = first or self.asked_ns
        return found, unreachable

    def _fires(self, f: Followed) -> int:
        """When a followed socket's timer runs: a TIME_WAIT's, armed for TIME_WAIT_LEN,
        on the timer wheel's grain past its expiry (nominal until the wheel is known)."""
        if f.state != TIME_WAIT:
            return f.due_ns
        fires = self.wheel.fires_ns(f.due_ns - TIME_WAIT_LEN_NS, f.due_ns)
        return f.due_ns if fires is None else fires

    def _timers_out(self, now: int) -> list[Event]:
        """The sockets in TIME_WAIT not asked for whose timer ran: closed then."""
        due: list[tuple[Key, int]] = []
        for key, f in self.followed.items():
            if f.due_ns > now + DUE_ORDER_SLACK_NS:
                break  # the rest fall due later
            if f.state != TIME_WAIT:
                continue
            fires = self._fires(f)
            if fires + DUE_GRACE_NS <= now:
                due.append((key, fires))
        made = []
        for key, fires in due:
            f = self.followed[key]
            self._forget(key)
            if self.wheel.hz is None and f.since_flags:
                # the wheel's grain unknown: at least until its expiry
                f.since_flags = F_DELTA_LOWER
            made.append(self._closed(f, max(fires, f.last_seen_ns)))
        return made

    def _confirm_missing(
        self, seen: Mapping[Key, SockEntry], now: int, asking: Mapping[Key, Followed]
    ) -> tuple[dict[Key, SockEntry], set[Key]]:
        """The followed sockets a dump did not show though their timer was not due, each
        looked up alone: the rows found (the others are gone: a reset, or a SYN took
        the 4-tuple), and those past MAX_CONFIRMS, left for the next poll."""
        missing = [
            (key, f)
            for key, f in asking.items()
            if key not in seen and self._fires(f) > now and self.tables.get(key[0]) is not None
        ]
        confirmed: dict[Key, SockEntry] = {}
        if not missing:
            return confirmed, set()
        started = time.monotonic()
        try:
            for key, f in missing[:MAX_CONFIRMS]:
                table = self.tables.get(key[0])
                row = table.find(f.template[_FAMILY], (key[1], key[2]), (key[3], key[4]))
                if row is not None and row.timewait and (key[0], *row.key) == key:
                    confirmed[key] = row
                    self.read_at[key] = self._sent(table) or now
        finally:
            self.budget.charge(started)
        return confirmed, {key for key, _f in missing[MAX_CONFIRMS:]}

    def _drop_followed(self, namespaces: set[int]) -> list[Event]:
        """Forget the sockets of namespaces that have gone: their end is unknown. One
        still waiting in FIN_WAIT2 had the kernel's FIN_WAIT2 -> CLOSE held back: it is
        given back, marked unsure, so that every traced transition is shown or counted
        (--lifetime: its connection is dropped, as the others)."""
        dropped = [k for k in self.followed if k[0] in namespaces]
        back: list[Event] = []
        for key in dropped:
            f = self.followed[key]
            self._forget(key)
            if f.state == FIN_WAIT2 and self.lives is None:
                back.append(self._give_back(f))
            else:
                self.dropped_with_netns += 1
        if dropped and self.on_dropped is not None:
            self.on_dropped(dropped)
        states = self.filters.states
        return [ev for ev in back if not states or self.filters.shows(ev.oldstate, ev.newstate)]

    def _give_back(self, f: Followed) -> Event:
        """The kernel's own end of a socket held back while it waited in FIN_WAIT2."""
        ev = f.template
        self.fixes.move(ev.oldstate, CLOSE)
        if f.kernel_partial_ns is not None:
            self.fixes.add(FIN_WAIT2, f.kernel_partial_ns)
        self.unfollowed += 1
        return ev._replace(flags=ev.flags | F_END_UNSURE)

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
            summary.remark(
                "time_wait_dropped_with_netns",
                self.dropped_with_netns,
                f"TIME_WAIT: {self.dropped_with_netns} followed sockets dropped with their "
                "network namespace (it was deleted: their end is not known)",
            )
        if self.kernel_problem:
            summary.remark("time_wait_kernel_distrusted", 1, f"TIME_WAIT: {self.kernel_problem}")
        if self.unfollowed:
            summary.remark(
                "time_wait_not_followed",
                self.unfollowed,
                f"TIME_WAIT: {self.unfollowed} closing sockets not followed "
                f"(beyond {MAX_FOLLOW_RATE:,} new a second for {self.over_rate}, the "
                f"reader behind for {self.behind_count}, over {MAX_FOLLOWED:,} followed, "
                "sock_diag budget spent, or their 4-tuple "
                "reused before they were looked up): their FIN_WAIT2/CLOSING -> CLOSE may "
                "have been a TIME_WAIT",
            )


def _band_order(key: Key) -> tuple[int, int, int]:
    return (key[0], key[2], key[4])


def _unsure(events: list[Event], ends: list[Event]) -> list[Event]:
    """The batch with these ends (not looked up) marked: they may hide a TIME_WAIT."""
    marked = {id(ev) for ev in ends}
    return [ev._replace(flags=ev.flags | F_END_UNSURE) if id(ev) in marked else ev for ev in events]


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
