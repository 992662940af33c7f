"""Connection lifetimes, like tcplife: one record per finished connection.

Built from the same event stream as the per-transition lines (after
enrichment and TIME_WAIT following), so a connection that ends in TIME_WAIT is
finished when its timewait socket goes. Records are plain dataclasses:
`dataclasses.asdict` turns one into JSON- or CSV-ready values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tcptrace.kernel.events import Event
from tcptrace.stages import Stage
from tcptrace.states import TcpState, is_birth, state_name

CLOSE = int(TcpState.CLOSE)
LISTEN = int(TcpState.LISTEN)
TIME_WAIT = int(TcpState.TIME_WAIT)
# Connections being tracked at once; the oldest are dropped beyond this.
MAX_OPEN = 65536


@dataclass
class StateTime:
    state: str
    duration_ns: int | None  # None: unknown (the socket predates tracing)
    lower_bound: bool = False  # at least this long (it was in the state when tracing began)


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

    def __init__(self, emit: Callable[[list[Lifetime]], None]) -> None:
        self.emit = emit
        self.open: dict[int, Lifetime] = {}  # skaddr -> connection
        # connections in TIME_WAIT: their socket is gone (the address may be reused)
        self.waiting: dict[tuple[str, int, str, int], Lifetime] = {}
        # --count with --lifetime: connections still to hand on, then stop is called
        self.remaining: int | None = None
        self.stop: Callable[[], None] | None = None

    def stop_after(self, count: int, stop: Callable[[], None]) -> None:
        """Hand on `count` finished connections, then call `stop` and take no more."""
        self.remaining, self.stop = count, stop

    def on_events(self, events: list[Event]) -> None:
        if self.remaining is not None and self.remaining <= 0:
            return  # --count reached: the run is stopping
        done: list[Lifetime] = []
        for ev in events:
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
        if done and self.remaining is not None:
            done = done[: self.remaining]
            self.remaining -= len(done)
            if not self.remaining and self.stop is not None:
                self.stop()
        if done:
            self.emit(done)

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
