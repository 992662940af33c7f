"""Who accepted: the handshake lines of a listener shared across fork() name the
process that accepted the connection, not the listener's creator.

nginx, apache prefork, gunicorn, php-fpm, postgres: a master listens, then forks
workers that accept on its socket. A new connection's handshake (LISTEN -> SYN_RECV
-> ESTABLISHED) happens before any process holds it, and the kernel names it after
the listener's creator, the master, which never accepts. The accept hook (bpf/,
ACCEPT_HOOK) gives the socket its acceptor from accept() on, and sends a record
(F_ACCEPTED) when that is another process than its lines named so far.

Once such a record showed a listener shared (or the start-up snapshot saw several
processes holding it), the handshake lines of its children wait here for their
accept, up to HOLD_NS of reading (an output that blocked meanwhile does not count:
the records that came then are read first), and then name the acceptor; the lines
read after them wait too, so the output stays in time order. Until that listener
closes: the next one on the port is another socket. An accept read before the lines
it names (records of two CPUs reach user space a little out of order when a program
is held up between stamping and writing; accept() can take a child before its
SYN_RECV -> ESTABLISHED) is kept as long, and names them as they come. A child not
accepted by then (a full accept queue, a client that gave up) keeps the listener's
creator, marked as one of several holders (F_OWNER_SHARED: text "PID+", JSON and
CSV a note), as `ss -tp` lists a socket shared by several processes. The first
connection of a listener forked after tracing began names the creator on its
handshake lines: no accept of another process had shown the listener shared yet.

Under owner filters (--pid, --comm, --cgroup) a connection is the acceptor's from
its first line: the kernel sends the handshake lines of a shared listener's
children whose creator does not match undecided (F_UNDECIDED, not counted), and
says on each accept record whether the acceptor matches (F_MATCHED). Here the
lines of a matching acceptor are told and counted; those of another are dropped
(and uncounted, when the kernel had counted them for the listener's creator).
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Iterable

from tcptrace.kernel.events import (
    F_ACCEPTED,
    F_DELTA_KNOWN,
    F_MATCHED,
    F_MOVED,
    F_OWNER_KNOWN,
    F_OWNER_SHARED,
    F_STUCK,
    F_UNDECIDED,
    Event,
)
from tcptrace.kernel.stats import Summary
from tcptrace.sockets.timewait import Corrections
from tcptrace.stages import Stage
from tcptrace.states import TcpState

# How long (monotonic, from when it was read) a handshake line of a shared listener
# waits for its accept: workers accept within micro- to milliseconds unless the
# server is overloaded, and everything read after it waits as long.
HOLD_NS = 1_000_000_000
# Lines held at most (a second of the fastest churn): past it the oldest waiting
# socket goes out without its acceptor.
MAX_HELD = 200_000
# An accept record's old and new state: no TCP state (Linux's run 1..12).
NO_STATE = 0
CLOSE = int(TcpState.CLOSE)
LISTEN = int(TcpState.LISTEN)
BIRTH = (LISTEN, int(TcpState.SYN_RECV))  # a listener's child
HANDSHAKE = frozenset(
    {
        (int(TcpState.LISTEN), int(TcpState.SYN_RECV)),
        (int(TcpState.SYN_RECV), int(TcpState.ESTABLISHED)),
    }
)

_OLD = Event._fields.index("oldstate")
_NEW = Event._fields.index("newstate")
_SKADDR = Event._fields.index("skaddr")
_NETNS = Event._fields.index("netns")
_SPORT = Event._fields.index("sport")
_TS = Event._fields.index("ts_ns")
_old_state = operator.itemgetter(_OLD)

Listener = tuple[int, int]  # (network namespace inode, port)


class _Held:
    """A line read and not told yet; sk is set while it waits for its socket's accept."""

    __slots__ = ("ev", "sk")

    def __init__(self, ev: Event, sk: int | None) -> None:
        self.ev: Event | None = ev  # None: dropped (another process accepted it)
        self.sk = sk


class Acceptors(Stage):
    """Holds the handshake lines of shared listeners' children until their accept."""

    def __init__(
        self,
        hold_ns: int = HOLD_NS,
        clock: Callable[[], int] = time.monotonic_ns,
        owner_filtered: bool = False,
        mark_shared: Callable[[int, int, bool], None] | None = None,
    ) -> None:
        self.hold_ns = hold_ns
        self.clock = clock
        self.shared: set[Listener] = set()
        self.held: list[_Held] = []  # in time order, from the oldest waiting line on
        self.first = 0  # held[first:] are still held (a list: no O(n) pops)
        # socket -> (when its first line was read, its held lines)
        self.waiting: dict[int, tuple[int, list[_Held]]] = {}
        # socket -> (when read, accept record) of the last HOLD_NS's accepts, oldest
        # first: lines read after their accept name the acceptor
        self.early: dict[int, tuple[int, Event]] = {}
        self.named = 0  # connections whose handshake lines named their acceptor
        self.unnamed = 0  # waited HOLD_NS for an accept that did not come
        # --pid/--comm/--cgroup: connections are chosen by their acceptor
        self.owner_filtered = owner_filtered
        # tells the kernel a listening port is shared (loader.Probe.mark_shared)
        self.mark_shared = mark_shared
        self.fixes = Corrections()  # lines told or dropped against the kernel's count
        self._batch_ns: int | None = None  # when the last batch was read, until a tick

    def on_events(self, events: list[Event]) -> list[Event] | None:
        if not events or events[0].flags & F_STUCK:
            return None  # the map scan's reports are not in the transitions' order
        if not self.shared and not self.waiting and NO_STATE not in set(map(_old_state, events)):
            return None  # no shared listener known, no accept: as read
        now = self._batch_ns = self.clock()
        out: list[Event] = []
        for ev in events:
            old = ev[_OLD]
            if old == NO_STATE and ev.flags & F_ACCEPTED:
                self._accepted(ev)
                continue
            sk = ev[_SKADDR]
            wait = self.waiting.get(sk)
            if wait is not None and (old == CLOSE or (old, ev[_NEW]) == BIRTH):
                # a new socket at the address of one that closed waiting: not its
                self._unnamed(sk)
                wait = None
            elif old == LISTEN and ev[_NEW] == CLOSE:
                self._listener_closed((ev[_NETNS], ev[_SPORT]))
            if wait is not None:  # a later line of a socket not accepted yet
                entry = _Held(ev, sk)
                wait[1].append(entry)
            elif ev.flags & F_UNDECIDED or (
                (ev[_OLD], ev[_NEW]) in HANDSHAKE and (ev[_NETNS], ev[_SPORT]) in self.shared
            ):
                record = self._early_accept(ev)
                if record is None:
                    entry = _Held(ev, sk)
                    self.waiting[sk] = (now, [entry])
                else:
                    named = self._name(ev, record)
                    if named is None:
                        continue  # another process's, under owner filters
                    if self.first == len(self.held):
                        out.append(named)
                        continue
                    entry = _Held(named, None)
            elif self.first < len(self.held):
                entry = _Held(ev, None)
            else:
                out.append(ev)
                continue
            self.held.append(entry)
        out += self._release(now)
        return out

    def on_tick(self, now_ns: int) -> list[Event] | None:
        # Waits are timed by the reads: right after a batch, as of when it was read.
        # Its output may have blocked (a pipe read late) for longer than a wait, and
        # the accept records that came meanwhile are in the ring, read next.
        now = self.clock() if self._batch_ns is None else self._batch_ns
        self._batch_ns = None
        if self.early:
            self._forget_early(now)
        return self._release(now) if self.waiting else None

    def on_drained(self, now_ns: int) -> list[Event] | None:
        # nothing more will be read: whoever did not accept by now is not known
        for sk in list(self.waiting):
            self._unnamed(sk)
        return self._release(self.clock()) or None

    def corrections(self) -> Corrections:
        """What on_finish would change in a summary taken now (--metrics, -i)."""
        return self.fixes.copy()

    def on_finish(self, summary: Summary) -> None:
        self.fixes.apply_to(summary)

    def share(self, listeners: Iterable[Listener]) -> None:
        """Listeners several processes hold (the start-up snapshot saw them so)."""
        for listener in listeners:
            self._share(listener)

    def _share(self, listener: Listener) -> None:
        if listener not in self.shared:
            self.shared.add(listener)
            if self.mark_shared is not None:
                self.mark_shared(*listener, True)

    def _listener_closed(self, listener: Listener) -> None:
        """A listener on a shared port closed: the next one there is another socket,
        shared only once an accept record shows it so. (Of several SO_REUSEPORT sockets
        on the port, the next accept by another process shares it again.)"""
        if listener in self.shared:
            self.shared.discard(listener)
            if self.mark_shared is not None:
                self.mark_shared(*listener, False)

    def _accepted(self, record: Event) -> None:
        """An accept record: its socket's lines name the acceptor (under owner filters:
        told if the acceptor matches, else dropped); its listener is shared when they
        named another process (F_MOVED), not when they named nobody (a connection that
        waited in the accept queue when tracing began, its first line a softirq's)."""
        if record.flags & F_MOVED:
            self._share((record[_NETNS], record[_SPORT]))
        sk = record[_SKADDR]
        # kept for its lines still to come (all of them when read out of order; the
        # child's SYN_RECV -> ESTABLISHED when accept() took it before that)
        self.early.pop(sk, None)  # oldest first: a repeat goes to the end
        self.early[sk] = (self.clock(), record)
        if len(self.early) > MAX_HELD:
            del self.early[next(iter(self.early))]
        wait = self.waiting.pop(sk, None)
        if wait is None:
            return
        self.named += 1
        for entry in wait[1]:
            ev = entry.ev
            entry.sk = None
            if ev is not None:
                entry.ev = self._name(ev, record)

    def _name(self, ev: Event, record: Event) -> Event | None:
        """A handshake line (or one after it) as its accept record tells it: the
        acceptor's; None under owner filters when the acceptor does not match."""
        if self.owner_filtered and not record.flags & F_MATCHED:
            if not ev.flags & F_UNDECIDED:
                self._count(ev, -1)  # counted for the listener's creator, who matched
            return None
        if ev.flags & F_UNDECIDED:
            self._count(ev, 1)
        return ev._replace(
            pid=record.pid,
            comm=record.comm,
            cgroup_id=record.cgroup_id,
            flags=(ev.flags | F_OWNER_KNOWN) & ~F_UNDECIDED,
        )

    def _early_accept(self, ev: Event) -> Event | None:
        """The accept record read before this handshake line, if it names it: not when
        the line is the birth of a socket made at the same address after that accept."""
        kept = self.early.get(ev[_SKADDR])
        if kept is None:
            return None
        record = kept[1]
        if (ev[_OLD], ev[_NEW]) == BIRTH:
            if ev[_TS] > record[_TS]:
                del self.early[ev[_SKADDR]]
                return None
            self.named += 1  # a child whose lines came after its accept
        return record

    def _forget_early(self, now: int) -> None:
        """Accepts kept HOLD_NS for lines that did not come (told already, or another
        process's: its handshake was not held)."""
        early = self.early
        while early:
            sk = next(iter(early))
            if now - early[sk][0] < self.hold_ns:
                break
            del early[sk]

    def _unnamed(self, sk: int) -> None:
        """No accept came in time: the socket's lines keep the listener's creator,
        marked as one of several holders (undecided ones go: nobody matching took it)."""
        _since, entries = self.waiting.pop(sk)
        self.unnamed += 1
        for entry in entries:
            ev = entry.ev
            entry.sk = None
            if ev is not None:
                shown = not ev.flags & F_UNDECIDED
                entry.ev = ev._replace(flags=ev.flags | F_OWNER_SHARED) if shown else None

    def _count(self, ev: Event, n: int) -> None:
        """Count a line the kernel did not (n = 1), or take back one it did (n = -1)."""
        self.fixes.move(ev.oldstate, ev.newstate, n)
        self.fixes.synthetic += n
        if ev.flags & F_DELTA_KNOWN:
            (self.fixes.add if n > 0 else self.fixes.remove)(ev.oldstate, ev.delta_ns)

    def _release(self, now: int) -> list[Event]:
        """The held lines that can go: from the oldest on, up to the first still waiting
        for an accept (one that waited HOLD_NS, or beyond MAX_HELD, goes without)."""
        held, n = self.held, self.first
        while n < len(held):
            sk = held[n].sk
            if sk is not None:
                since = self.waiting[sk][0]
                if now - since < self.hold_ns and len(held) - n <= MAX_HELD:
                    break
                self._unnamed(sk)
            n += 1
        ready = [entry.ev for entry in held[self.first : n] if entry.ev is not None]
        if n == len(held):
            self.held, self.first = [], 0
        elif n > len(held) // 2:
            self.held, self.first = held[n:], 0  # compacted now and then
        else:
            self.first = n
        return ready
