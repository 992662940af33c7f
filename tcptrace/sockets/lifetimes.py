"""Connection lifetimes, like tcplife: one record per finished connection.

The kernel sums each connection's time in each state and sends one life record when
its socket closes (kernel.events.Life): the probe hands on its closing transition as
an Event, which enrichment (owner) and TIME_WAIT following (FIN_WAIT2 -> TIME_WAIT,
later TIME_WAIT -> CLOSE) treat like any other, and keeps the record for this stage
(use_kernel), found by the Event's (skaddr, ts_ns). A connection that ends in
TIME_WAIT is finished when its timewait socket goes.

Without the kernel's records (use_kernel not called) a connection is built from its
transitions as they come, as before. Records are plain dataclasses:
`dataclasses.asdict` turns one into JSON- or CSV-ready values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from tcptrace.compat import slotted
from tcptrace.kernel.events import (
    F_DELTA_LOWER,
    F_OWNER_KNOWN,
    LIFE_VISITS,
    Event,
    Life,
    decode_comm,
    format_addr,
)
from tcptrace.stages import Stage
from tcptrace.states import TcpState, is_birth, state_name

CLOSE = int(TcpState.CLOSE)
LISTEN = int(TcpState.LISTEN)
TIME_WAIT = int(TcpState.TIME_WAIT)
# Connections being tracked at once; the oldest are dropped beyond this.
MAX_OPEN = 65536
# Positions in an Event tuple, for the per-record path (C-level indexing).
_SKADDR = Event._fields.index("skaddr")
_NEW = Event._fields.index("newstate")
# Positions in a Life tuple (events.Life), for the per-record path.
_BIRTH = Life._fields.index("birth_ns")
_VISITS = Life._fields.index("visits")
# State names by number, for the per-record path.
_NAMES = tuple(state_name(n) for n in range(256))


@slotted
@dataclass
class StateTime:
    state: str
    duration_ns: int | None  # None: unknown (the socket predates tracing)
    lower_bound: bool = False  # at least this long (it was in the state when tracing began)


@slotted
@dataclass
class Lifetime:
    start_ns: int  # CLOCK_MONOTONIC, as event timestamps; a lower bound unless complete
    end_ns: int
    pid: int  # 0 with comm "" when no owner could be known
    comm: str
    family: int
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int
    duration_ns: int
    complete: bool  # seen from its first transition; else duration_ns is a lower bound
    states: list[StateTime] = field(default_factory=list)
    netns: int = 0  # the socket's network namespace (inode), 0 when unknown
    cgroup_id: int = 0  # its owner's cgroup v2 id as the kernel saw it, 0 when unknown


class Lifetimes(Stage):
    """Follows each connection through its transitions; hands finished ones to `emit`."""

    def __init__(
        self,
        emit: Callable[[list[Lifetime]], None],
        states: Iterable[int] = (),
        records: bool = False,
    ) -> None:
        self.emit = emit
        # hand a whole connection on as (closing Event, kernel record) when nothing in
        # user space changes it: born traced, closed now, every state kept (the text
        # output formats those itself, outputs.output.LifetimeFormatter.record_line)
        self.records = records
        # --state: only connections that spent time in one of these states
        self.states = frozenset(state_name(int(s)) for s in states)
        # the kernel's life records of the batch being handled (loader.Probe.lives), by
        # (skaddr, ts_ns) of their closing Event; None: built from transitions
        self.kernel: dict[tuple[int, int], Life] | None = None
        self.open: dict[int, Lifetime] = {}  # skaddr -> connection
        # connections in TIME_WAIT: their socket is gone (the address may be reused)
        self.waiting: dict[tuple[str, int, str, int], Lifetime] = {}
        # --count with --lifetime: connections still to hand on, then stop is called
        self.remaining: int | None = None
        self.stop: Callable[[], None] | None = None

    def stop_after(self, count: int, stop: Callable[[], None]) -> None:
        """Hand on `count` finished connections, then call `stop` and take no more."""
        self.remaining, self.stop = count, stop

    def use_kernel(self, lives: dict[tuple[int, int], Life]) -> None:
        """Take each connection from the kernel's life record (the probe refills `lives`
        with each batch's records)."""
        self.kernel = lives

    def on_events(self, events: list[Event]) -> None:
        if self.remaining is not None and self.remaining <= 0:
            return  # --count reached: the run is stopping
        done: list[Lifetime] = []
        kernel = self.kernel
        # (--state looks into the states: it needs the Lifetime)
        whole = self.records and not self.states
        take = kernel.pop if kernel else None
        for ev in events:
            if take is not None:
                record = take((ev[_SKADDR], ev[0]), None)
                if record is not None:
                    if (
                        whole
                        and ev[_NEW] == CLOSE
                        and record[_BIRTH]
                        and record[_VISITS] <= LIFE_VISITS
                    ):
                        done.append((ev, record))  # type: ignore[arg-type]
                        continue
                    # the kernel's whole connection: it ends now, or enters TIME_WAIT
                    life = _from_record(ev, record)
                    if ev[_NEW] == CLOSE:
                        life.end_ns = end = ev[0]
                        life.duration_ns = max(0, end - life.start_ns)
                        done.append(life)
                    else:
                        self.waiting[_key(ev)] = life
                    continue
            life = self._find(ev)
            if life is None:
                continue
            if ev.owner_known and not life.pid:
                life.pid, life.comm, life.cgroup_id = ev.pid, ev.command, ev.cgroup_id
            _update_ends(life, ev)
            if self.open.get(ev.skaddr) is life and ev.newstate in (TIME_WAIT, CLOSE):
                # (a socket leaving TIME_WAIT is long gone: its address may be another's)
                del self.open[ev.skaddr]
            if ev.newstate == TIME_WAIT:
                self.waiting[_key(ev)] = life
            elif ev.newstate == CLOSE:
                life.end_ns = ev.ts_ns
                life.duration_ns = max(0, ev.ts_ns - life.start_ns)
                done.append(life)
        if kernel:
            self._held(kernel)
        if done and self.states:
            done = [life for life in done if any(s.state in self.states for s in life.states)]
        if done and self.remaining is not None:
            done = done[: self.remaining]
            self.remaining -= len(done)
            if not self.remaining and self.stop is not None:
                self.stop()
        if done:
            self.emit(done)

    def _held(self, kernel: dict[tuple[int, int], Life]) -> None:
        """Records whose closing Event a stage held back: TIME_WAIT following keeps a
        socket's FIN_WAIT2 -> CLOSE while its timewait socket still waits in FIN_WAIT2
        for the peer, and hands on FIN_WAIT2 -> TIME_WAIT (or -> CLOSE) later, with the
        whole time in FIN_WAIT2. Until then the connection waits here, without it."""
        for record in kernel.values():
            ev = record.event
            life = _from_record(ev, record)
            life.states.pop()  # the closing visit: the later event gives its whole time
            self.open[ev.skaddr] = life
        _bound(self.open)
        kernel.clear()

    def _find(self, ev: Event) -> Lifetime | None:
        if ev.oldstate == TIME_WAIT:
            life = self.waiting.pop(_key(ev), None)
            if life is not None:
                life.states.append(_state_time(ev))
            return life
        listener = ev.newstate == LISTEN or (ev.oldstate == LISTEN and ev.newstate == CLOSE)
        if listener:
            return None
        if is_birth(ev.oldstate, ev.newstate):
            life = _new(ev, ev.ts_ns, complete=True)
            self.open[ev.skaddr] = life  # replaces a stale record of a reused address
            _bound(self.open)
            return life
        life = self.open.get(ev.skaddr)
        if life is None:
            # first seen mid-life: it started at least as long ago as its current state
            known = ev.delta_known or ev.delta_lower
            life = _new(ev, ev.ts_ns - (ev.delta_ns if known else 0), complete=False)
            self.open[ev.skaddr] = life
            _bound(self.open)
        life.states.append(_state_time(ev))
        return life


def _from_record(ev: Event, record: Life) -> Lifetime:
    """A connection from the kernel's record; ev is its closing transition as enriched
    (the owner found in user space, the time in a state older than tracing). Not yet
    ended: end_ns and duration_ns are the caller's. The per-connection path: no
    Event properties, no helpers."""
    (ts, delta, _sk, cgroup_id, pid, flags, netns, _r, saddr, daddr, sport, dport, family,
     _old, _new, comm) = ev  # fmt: skip
    _event, birth, visited, times, visits = record
    names = _NAMES
    if visits < LIFE_VISITS:
        visited = visited[:visits]
    states = [StateTime(names[state], ns) for state, ns in zip(visited, times)]
    if visits > LIFE_VISITS:
        # (not in Linux's state machine) the last slot holds the time of the rest
        states[-1].state += f"+{visits - LIFE_VISITS}"
    if birth:
        start = birth
    else:
        # first seen mid-life: untimed in the state it was first seen in, unless
        # enrichment knew it from the snapshot (it was first seen as it closed)
        first = states[0]
        if len(states) == 1 and flags & F_DELTA_LOWER:
            first.duration_ns, first.lower_bound = delta, True
        else:
            first.duration_ns = None
        # it began at least as long ago as the times known
        start = ts - sum(s.duration_ns or 0 for s in states)
    owned = flags & F_OWNER_KNOWN
    return Lifetime(
        start,
        0,
        pid if owned else 0,
        decode_comm(comm) if owned else "",
        family,
        format_addr(family, saddr),
        sport,
        format_addr(family, daddr),
        dport,
        0,
        bool(birth),
        states,
        netns,
        cgroup_id if owned else 0,
    )


def _new(ev: Event, start_ns: int, complete: bool) -> Lifetime:
    return Lifetime(
        start_ns=start_ns,
        end_ns=0,
        pid=ev.pid if ev.owner_known else 0,
        comm=ev.command if ev.owner_known else "",
        family=ev.family,
        local_addr=ev.local_addr,
        local_port=ev.sport,
        remote_addr=ev.remote_addr,
        remote_port=ev.dport,
        duration_ns=0,
        complete=complete,
        netns=ev.netns,
        cgroup_id=ev.cgroup_id if ev.owner_known else 0,
    )


def _update_ends(life: Lifetime, ev: Event) -> None:
    """Each end as the latest event that knows it has it: connect() enters SYN_SENT
    before the kernel chooses the local port (0 then), and before Linux 6.15 an
    accepted socket's LISTEN -> SYN_RECV carries the listener's ends (remote port 0,
    maybe local address 0.0.0.0)."""
    if ev.sport:
        life.local_addr, life.local_port = ev.local_addr, ev.sport
    if ev.dport:
        life.remote_addr, life.remote_port = ev.remote_addr, ev.dport


def _state_time(ev: Event) -> StateTime:
    if ev.delta_known:
        return StateTime(state_name(ev.oldstate), ev.delta_ns)
    if ev.delta_lower:
        return StateTime(state_name(ev.oldstate), ev.delta_ns, lower_bound=True)
    return StateTime(state_name(ev.oldstate), None)


def _key(ev: Event) -> tuple[int, str, int, str, int]:
    # two namespaces may hold the same 4-tuple
    return (ev.netns, ev.local_addr, ev.sport, ev.remote_addr, ev.dport)


def _bound(table: dict) -> None:
    while len(table) > MAX_OPEN:
        del table[next(iter(table))]
