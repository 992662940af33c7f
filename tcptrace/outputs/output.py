"""Formatting: transitions as aligned text lines, durations in human units, the summary.

Works on plain Event values; knows nothing of bcc or sock_diag.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, TextIO

from tcptrace.kernel.events import (
    C_SEEN,
    F_DELTA_KNOWN,
    F_DELTA_LOWER,
    F_OWNER_KNOWN,
    F_OWNER_SHARED,
    LIFE_VISITS,
    Event,
    decode_comm,
    format_addr,
)
from tcptrace.kernel.stats import PERCENTILES, Summary
from tcptrace.states import LIFECYCLE_ORDER, state_name

if TYPE_CHECKING:
    from tcptrace.sockets.places import Places

NS_PER_US = 1_000
NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000

# Timestamp styles for --timestamp.
TS_WALL = "wall"
TS_RELATIVE = "relative"
TS_ISO = "iso"
TS_NONE = "none"
TIMESTAMP_STYLES = (TS_WALL, TS_RELATIVE, TS_ISO, TS_NONE)

# Widest state name (ESTABLISHED, CLOSE_WAIT...) for the OLD -> NEW column.
_STATE_WIDTH = 11
_ENDPOINT_WIDTH = 21  # 255.255.255.255:65535
# [ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535: the first endpoint wider than
# _ENDPOINT_WIDTH widens the columns this far at once (and the header is printed
# again above the wider lines), so a stream re-heads once, not at every longer address
_WIDE_ENDPOINT_WIDTH = 47


def wider(width: int, text: str) -> int:
    """The endpoint column's width once `text` is in it."""
    return width if len(text) <= width else max(len(text), _WIDE_ENDPOINT_WIDTH)


def format_duration(ns: float) -> str:
    """A duration in the unit a person reads at a glance: 850ns, 12.3µs, 1.23ms, 4.56s, 2m03s."""
    if ns < NS_PER_US:
        return f"{ns:.0f}ns"
    if ns < NS_PER_MS:
        return f"{ns / NS_PER_US:.1f}µs"
    if ns < NS_PER_S:
        return f"{ns / NS_PER_MS:.2f}ms"
    seconds = ns / NS_PER_S
    if seconds < 60:
        return f"{seconds:.3f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# What a character that cannot be printed shows as, as in ps.
UNPRINTABLE = "?"


def printable(text: str) -> str:
    """A name anybody may choose (a process's comm) safe for a terminal: every control
    or other non-printable character (line breaks, tabs, ESC, C1 controls, bidi
    overrides) becomes '?', as ps shows it, so no name can forge a line or send an
    escape sequence. JSON and CSV keep names exactly (they escape them their way)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else UNPRINTABLE for ch in text)


def event_duration(ev: Event) -> str:
    """Time in the old state: measured, at least (">=", socket older than tracing), or "-"."""
    if ev.delta_known:
        return format_duration(ev.delta_ns)
    if ev.flags & F_DELTA_LOWER:
        return ">=" + format_duration(ev.delta_ns)
    return "-"


SERVICES_FILE = "/etc/services"


@lru_cache(maxsize=1)
def _services(path: str = SERVICES_FILE) -> dict[int, str] | None:
    """TCP port -> service name from the services file, read once.

    getservbyport re-reads the file on every call (tens of µs); churned ephemeral
    ports would each pay that. None when the file is unreadable (then getservbyport).
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return None
    names: dict[int, str] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or "/" not in fields[1]:
            continue
        number, _, proto = fields[1].partition("/")
        if proto == "tcp" and number.isdigit():
            names.setdefault(int(number), fields[0])  # the first entry wins, as getservbyport
    return names


@lru_cache(maxsize=1024)  # the formatters cache whole endpoints; this serves their misses
def port_name(port: int, numeric: bool) -> str:
    """Port as a service name unless numeric (as ss -n); 0 (not yet chosen) is '*', as in ss."""
    if port == 0:
        return "*"
    if numeric:
        return str(port)
    names = _services()
    if names is not None:
        return names.get(port, str(port))
    try:
        return socket.getservbyport(port, "tcp")
    except OSError:
        return str(port)


def address_prefix(addr: str) -> str:
    """An address as it stands before its port: "10.0.0.1:", IPv6 in brackets."""
    return f"[{addr}]:" if ":" in addr else f"{addr}:"


def endpoint(family: int, raw: bytes, port: int, numeric: bool) -> str:
    return endpoint_text(format_addr(family, raw), port, numeric)


@dataclass
class Clock:
    """Turns the kernel's monotonic nanoseconds into the chosen timestamp style."""

    style: str = TS_WALL
    start_mono_ns: int = 0
    # wall clock minus monotonic clock, taken once at start
    offset_ns: int = 0
    _sec: int = field(default=-1, repr=False, compare=False)
    _sec_text: str = field(default="", repr=False, compare=False)

    @classmethod
    def now(cls, style: str) -> Clock:
        return cls(style, time.monotonic_ns(), time.time_ns() - time.monotonic_ns())

    def wall_ns(self, mono_ns: int) -> int:
        return mono_ns + self.offset_ns

    def seconds_text(self, secs: int) -> str:
        """HH:MM:SS (local time) of a wall-clock second: it changes rarely, so it is
        formatted once per second."""
        if secs != self._sec:
            self._sec = secs
            self._sec_text = time.strftime("%H:%M:%S", time.localtime(secs))
        return self._sec_text

    def format(self, mono_ns: int) -> str:
        if self.style == TS_WALL:
            secs, frac = divmod(mono_ns + self.offset_ns, NS_PER_S)
            return f"{self.seconds_text(secs)}.{frac // NS_PER_US:06d}"
        if self.style == TS_RELATIVE:
            return f"{(mono_ns - self.start_mono_ns) / NS_PER_S:10.6f}"
        if self.style == TS_NONE:
            return ""
        wall = self.wall_ns(mono_ns)
        secs, frac = divmod(wall, NS_PER_S)
        if self.style == TS_ISO:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
            return f"{stamp}.{frac // NS_PER_US:06d}Z"
        return f"{time.strftime('%H:%M:%S', time.localtime(secs))}.{frac // NS_PER_US:06d}"


def time_header(style: str) -> str:
    """The TIME column's heading (with its trailing space) for a timestamp style."""
    if style == TS_NONE:
        return ""
    if style == TS_RELATIVE:
        return f"{'TIME(s)':<10} "
    if style == TS_ISO:
        return f"{'TIME':<27} "
    return f"{'TIME':<15} "


def write_all(out: TextIO, text: str) -> None:
    """Write all of text to out, even when a signal interrupts a blocked write.

    CPython's text and buffered writers can silently drop the rest of a write to
    a full pipe when a signal (our Ctrl-C/SIGTERM handler) interrupts it half way;
    on a real file descriptor the bytes go out through os.write in a loop instead.
    """
    try:
        fd = out.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        out.write(text)
        return
    out.flush()  # whatever the stream still buffers goes first
    view = memoryview(text.encode(getattr(out, "encoding", None) or "utf-8", "replace"))
    while view:
        view = view[os.write(fd, view) :]


# Caches of formatted columns are dropped whole when they grow past this.
_CACHE_MAX = 16384
_NO_OWNER = f"{'-':>7} {'-':<15}"
# After a pid: one of several processes holding the socket's listener (F_OWNER_SHARED).
SHARED_MARK = "+"
_OWNER_FLAGS = F_OWNER_KNOWN | F_OWNER_SHARED
_NO_DURATION = f"{'-':>9}"
# The NETNS and CGROUP columns (-w, or a host with several namespaces): longer
# names are cut, as ps cuts its columns; a cgroup path keeps its end, which tells
# siblings apart (/pods/averyverylongname-abcdef as ...ylongname-abcdef).
_NETNS_WIDTH = 12
_CGROUP_WIDTH = 20
_CUT = "…"


def keep_end(text: str, width: int) -> str:
    """text in width columns: its end, after an ellipsis, when it does not fit."""
    return text if len(text) <= width else _CUT + text[len(text) - width + 1 :]


class TextFormatter:
    """One aligned line per transition.

    Built for wire speed: every column that repeats (endpoints, owner, the
    OLD -> NEW pair, the seconds of the time) is formatted once and cached, and
    a batch becomes one write.
    """

    def __init__(
        self,
        out: TextIO,
        clock: Clock,
        numeric: bool = False,
        places: Places | None = None,
        wide: bool = False,
        stuck_only: bool = False,
    ) -> None:
        self.out = out
        self.clock = clock
        self.numeric = numeric
        self.stuck_only = stuck_only  # no transitions, only stuck reports (their header)
        # the NETNS and CGROUP columns after the owner: with -w, or from the first
        # transition of a second namespace on (a header marks the change)
        self.places = places
        self.wide = wide and places is not None
        self.home_netns = 0  # the namespace of the transitions so far (0: none yet)
        # (netns, cgroup id, pid) -> " NETNS CGROUP" columns
        self._places: dict[tuple[int, int, int], str] = {}
        self.width = _ENDPOINT_WIDTH
        # (width, wide) of the last header written
        self.headed: tuple[int, bool] | None = None
        self.printed = 0
        # (family, address, port) -> endpoint padded to self.width
        self._endpoints: dict[tuple[int, bytes, int], str] = {}
        self._addresses: dict[bytes, bytes] = {}
        # (pid, comm) -> "    PID COMM           "
        self._owners: dict[tuple[int, bytes], str] = {}
        # (old, new) -> "   OLD -> NEW        "
        self._transitions: dict[tuple[int, int], str] = {}
        # tenths of a µs -> IN OLD column (below 1 ms: at most 10,000 entries)
        self._micros_text: dict[int, str] = {}

    def header(self) -> str:
        w = self.width
        time_col = self._time_header()
        where = f" {'NETNS':<{_NETNS_WIDTH}} {'CGROUP':<{_CGROUP_WIDTH}}" if self.wide else ""
        if self.stuck_only:  # --stuck alone: every line is "STUCK in STATE  AGE"
            change = f"{'':>{_STATE_WIDTH}}    {'STATE':<{_STATE_WIDTH}} {'AGE':>9}"
        else:
            change = f"{'OLD':>{_STATE_WIDTH}} -> {'NEW':<{_STATE_WIDTH}} {'IN OLD':>9}"
        return f"{time_col}{'PID':>7} {'COMM':<15}{where} {'LOCAL':<{w}} {'REMOTE':<{w}} {change}"

    def _time_header(self) -> str:
        return time_header(self.clock.style)

    def owner(self, ev: Event) -> tuple[str, str]:
        # enrich.Owners has already looked up what the kernel could not attribute
        if ev.owner_known:
            return str(ev.pid), printable(ev.command)
        return "-", "-"

    def _owner_column(self, ev: Event) -> str:
        if ev.flags & F_OWNER_SHARED and ev.flags & F_OWNER_KNOWN:
            # the listener's creator, one of its holders: none accepted the socket in time
            comm = printable(decode_comm(ev.comm))
            return f"{str(ev.pid) + SHARED_MARK:>7} {comm:<15.15}"
        if ev.flags & F_OWNER_KNOWN:
            key = (ev.pid, ev.comm)
            col = self._owners.get(key)
            if col is None:
                if len(self._owners) > _CACHE_MAX:
                    self._owners.clear()
                comm = printable(decode_comm(ev.comm))
                col = self._owners[key] = f"{ev.pid:>7} {comm:<15.15}"
            return col
        return _NO_OWNER  # enrich.Owners has already filled in what it could find

    def _place_column(self, netns: int, cgroup_id: int, pid: int, flags: int) -> str:
        assert self.places is not None
        known = bool(flags & F_OWNER_KNOWN)
        place = self.places.of(netns, cgroup_id, pid, known)
        if len(self._places) > _CACHE_MAX:
            self._places.clear()
        col = (
            f" {printable(place.netns_label):<{_NETNS_WIDTH}.{_NETNS_WIDTH}}"
            f" {keep_end(printable(place.cgroup_label), _CGROUP_WIDTH):<{_CGROUP_WIDTH}}"
        )
        if place.complete:
            self._places[(netns, cgroup_id, pid if known and not cgroup_id else 0)] = col
        return col

    def _endpoint(self, family: int, raw: bytes, port: int) -> str:
        # each event brings its own copy of the address: keep one per address
        raw = self._addresses.setdefault(raw, raw)
        key = (family, raw, port)
        col = self._endpoints.get(key)
        if col is None:
            text = endpoint(family, raw, port, self.numeric)
            if len(text) > self.width:
                # a wider address (IPv6): widen the column, re-pad what was cached
                self.width = wider(self.width, text)
                self._endpoints.clear()
            if len(self._endpoints) > _CACHE_MAX:
                self._endpoints.clear()
                self._addresses.clear()
            col = self._endpoints[key] = f"{text:<{self.width}}"
        return col

    def _transition(self, old: int, new: int) -> str:
        col = self._transitions.get((old, new))
        if col is None:
            if old == new:  # no transition has that: a stuck report (F_STUCK), its age after
                col = f"{STUCK_LABEL:>{_STATE_WIDTH}} in {state_name(old):<{_STATE_WIDTH}}"
            else:
                col = f"{state_name(old):>{_STATE_WIDTH}} -> {state_name(new):<{_STATE_WIDTH}}"
            self._transitions[(old, new)] = col
        return col

    def _micros(self, tenths: int) -> str:
        """The IN OLD column of a duration below 1 ms, cached by its tenths of a µs."""
        text = self._micros_text[tenths] = f"{tenths / 10:7.1f}µs"
        return text

    def lines(self, events: Iterable[Event]) -> list[str]:
        """The text lines of a batch (no newlines).

        The hot loop of the whole tool: one tuple unpacking, dictionary look-ups
        for the cached columns, the common duration units inline, one f-string a line.
        """
        width = self.width
        clock = self.clock
        wall = clock.style == TS_WALL
        timed = clock.style != TS_NONE
        offset = clock.offset_ns
        sec, sec_text = -1, ""
        endpoints = self._endpoints
        owners = self._owners
        transitions = self._transitions
        micros = self._micros_text
        wide = self.wide
        places = self._places if wide else None
        home = self.home_netns if self.places is not None and not wide else None
        out = []
        append = out.append
        for ev in events:
            (
                ts,
                delta,
                _sk,
                cgroup_id,
                pid,
                flags,
                netns,
                _r,
                saddr,
                daddr,
                sport,
                dport,
                family,
                old,
                new,
                comm,
            ) = ev
            local = endpoints.get((family, saddr, sport)) or self._endpoint(family, saddr, sport)
            remote = endpoints.get((family, daddr, dport)) or self._endpoint(family, daddr, dport)
            known = flags & _OWNER_FLAGS
            if known == F_OWNER_KNOWN:
                owner = owners.get((pid, comm)) or self._owner_column(ev)
            elif known:
                owner = self._owner_column(ev)  # one of a shared listener's holders
            else:
                owner = _NO_OWNER  # enrich.Owners has already filled in what it could find
            if home is not None and netns != home and netns:
                if home:  # a second namespace: the columns from now on
                    self.wide = True
                    return self.lines(events)
                self.home_netns = home = netns
            if places is not None:
                key = (netns, cgroup_id, pid if flags & F_OWNER_KNOWN and not cgroup_id else 0)
                owner += places.get(key) or self._place_column(netns, cgroup_id, pid, flags)
            change = transitions.get((old, new)) or self._transition(old, new)
            if flags & F_DELTA_KNOWN:
                if delta < NS_PER_US:
                    duration = f"{delta:7d}ns"
                elif delta < NS_PER_MS:
                    # in tenths of a µs, as shown (the ns below 1µs are few)
                    tenths = (delta + 50) // 100
                    duration = micros.get(tenths) or self._micros(tenths)
                elif delta < NS_PER_S:
                    duration = f"{delta / NS_PER_MS:7.2f}ms"
                else:
                    duration = f"{format_duration(delta):>9}"
            elif flags & F_DELTA_LOWER:
                duration = f"{'>=' + format_duration(delta):>9}"  # as event_duration()
            else:
                duration = _NO_DURATION
            if wall:
                secs, frac = divmod(ts + offset, NS_PER_S)
                if secs != sec:
                    sec, sec_text = secs, clock.seconds_text(secs)
                micro = frac // NS_PER_US
                append(f"{sec_text}.{micro:06d} {owner} {local} {remote} {change} {duration}")
            elif timed:
                append(f"{clock.format(ts)} {owner} {local} {remote} {change} {duration}")
            else:
                append(f"{owner} {local} {remote} {change} {duration}")
        if self.width != width:
            # an address widened the endpoint columns during this batch: pad anew
            return self.lines(events)
        return out

    def line(self, ev: Event) -> str:
        return self.lines((ev,))[0]

    def write_header(self) -> None:
        self.out.write(self.header() + "\n")
        self.headed = (self.width, self.wide)

    def write(self, events: Iterable[Event], transitions: bool = True) -> None:
        """Write these lines; `transitions`: they count as transitions shown (stuck
        reports do not)."""
        lines = self.lines(events)
        if lines:
            shown = len(lines)
            if self.headed not in (None, (self.width, self.wide)):
                # the columns widened or grew: a header above the lines, as they are now
                lines.insert(0, self.header())
                self.headed = (self.width, self.wide)
            lines.append("")
            write_all(self.out, "\n".join(lines))
            if transitions:
                self.printed += shown

    def write_still_stuck(self, still: list[Event]) -> None:
        """At exit: the sockets still past their --stuck threshold, oldest first."""
        if not still:
            self.out.write("no socket is stuck at exit\n")
            return
        self.out.write(f"{len(still)} still stuck at exit, oldest first:\n")
        lines = self.lines(still)
        write_all(self.out, "\n".join([self.header(), *lines, ""]))


def format_summary(summary: Summary, printed: int | None = None, lifetimes: bool = False) -> str:
    """The exit summary: per state, sockets that left it and the time spent in it.
    lifetimes: printed counts connections (--lifetime), and so do the losses."""
    cols = "".join(f"{'p' + format(p, 'g'):>9}" for p in PERCENTILES)
    lines = [
        f"{'STATE':<12}{'LEFT':>9}{'MEAN':>9}{cols}{'MAX':>9}{'UNTIMED':>9}",
    ]
    for state in LIFECYCLE_ORDER:
        stats = summary.states.get(int(state))
        if stats is None or (stats.count == 0 and stats.unknown == 0):
            continue
        if stats.count:
            pcts = "".join(f"{format_duration(stats.percentile(p)):>9}" for p in PERCENTILES)
            timed = f"{format_duration(stats.mean_ns):>9}{pcts}{format_duration(stats.max_ns):>9}"
        else:
            timed = f"{'-':>9}" * (len(PERCENTILES) + 2)
        left = stats.count + stats.unknown
        lines.append(f"{state.name:<12}{left:>9}{timed}{stats.unknown:>9}")
    if len(lines) == 1:
        lines.append("(no transitions)")
    lines.append(format_accounting(summary, printed, lifetimes))
    lines.extend(summary.notes)
    return "\n".join(lines) + "\n"


# The OLD column of a stuck report: "STUCK in CLOSE_WAIT", then its age.
STUCK_LABEL = "STUCK"


def format_accounting(summary: Summary, printed: int | None, lifetimes: bool = False) -> str:
    seen = summary.counters[C_SEEN]
    text = f"{seen} transitions traced"
    # --lifetime: the kernel sends one record per connection, and a lost one is a
    # connection not shown
    unit = " connections" if lifetimes else ""
    if printed is not None:
        text += f", {printed}{unit} shown"
        if summary.slower_than:
            # the rest were not lost: the kernel judged them too fast to show
            text += f" (slower than {summary.slower_than}), {summary.faster} faster"
    text += f", {summary.lost_total}{unit} lost"
    if summary.held:
        text += f", {summary.held} held: still in FIN_WAIT2 at exit"
    if summary.evicted:
        text += f", {summary.evicted} evicted from the full socket map (raise --max-sockets)"
    return text


def endpoint_text(addr: str, port: int, numeric: bool) -> str:
    """address:port from text addresses (sock_diag rows, lifetimes); IPv6 in brackets."""
    return address_prefix(addr) + port_name(port, numeric)


# State names by number, each with the space that follows it in a lifetime line.
_STATE_NAMES_SPACED = tuple(f"{state_name(n)} " for n in range(256))
PORTS = 65536


def _owner_columns(pid: int, comm: str) -> tuple[str, str]:
    return (str(pid), printable(comm)) if pid else ("-", "-")


class LifetimeFormatter:
    """One line per finished connection, like tcplife: owner, ends, lifetime, each state's time."""

    def __init__(
        self,
        out: TextIO,
        clock: Clock,
        numeric: bool = False,
        places: Places | None = None,
        wide: bool = False,
        stuck_only: bool = False,
    ) -> None:
        self.out = out
        self.clock = clock
        self.numeric = numeric
        self.stuck_only = stuck_only  # no transitions, only stuck reports (their header)
        # the NETNS and CGROUP columns, as TextFormatter shows them
        self.places = places
        self.wide = wide and places is not None
        self.home_netns = 0
        self.width = _ENDPOINT_WIDTH
        self.headed: tuple[int, bool] | None = None  # (width, wide) of the last header
        self.printed = 0
        # the parts that repeat, formatted once: "address:port", and the owner columns
        self._ends: dict[tuple[str, int], str] = {}
        self._owners: dict[tuple[int, str], str] = {}
        # the same from the kernel's raw fields (record_line): (family, address, port)
        # and (pid, comm bytes)
        self._raw_owners: dict[tuple[int, bytes], str] = {}
        # address text with its ":" by (family, raw address), port text by port (a
        # whole-endpoint cache would miss at every churned ephemeral port)
        self._addr_texts: dict[tuple[int, bytes], str] = {}
        self._port_texts: list[str | None] = [None] * PORTS
        self._sec, self._sec_text = -1, ""  # the wall-clock second of the last line

    def header(self) -> str:
        w = self.width
        time_col = time_header(self.clock.style)
        where = f" {'NETNS':<{_NETNS_WIDTH}} {'CGROUP':<{_CGROUP_WIDTH}}" if self.wide else ""
        return (
            f"{time_col}{'PID':>7} {'COMM':<15}{where} {'LOCAL':<{w}} {'REMOTE':<{w}} "
            f"{'LIFETIME':>10}  STATES"
        )

    def _end(self, addr: str, port: int) -> str:
        if len(self._ends) > _CACHE_MAX:
            self._ends.clear()
        text = self._ends[(addr, port)] = endpoint_text(addr, port, self.numeric)
        return text

    def _owner(self, pid: int, comm: str) -> str:
        if len(self._owners) > _CACHE_MAX:
            self._owners.clear()
        pid_col, comm_col = _owner_columns(pid, comm)
        text = self._owners[(pid, comm)] = f"{pid_col:>7} {comm_col:<15.15}"
        return text

    def line(self, life) -> str:  # life: lifetimes.Lifetime
        ends = self._ends
        local = ends.get((life.local_addr, life.local_port)) or self._end(
            life.local_addr, life.local_port
        )
        remote = ends.get((life.remote_addr, life.remote_port)) or self._end(
            life.remote_addr, life.remote_port
        )
        w = self.width
        if len(local) > w or len(remote) > w:
            self.width = w = wider(wider(w, local), remote)
        owner = self._owners.get((life.pid, life.comm)) or self._owner(life.pid, life.comm)
        stamp = self.clock.format(life.end_ns)
        stamp = f"{stamp} " if stamp else ""
        total = format_duration(life.duration_ns)
        if not life.complete:
            total = ">=" + total
        states = "  ".join(
            [
                f"{s.state} {format_duration(s.duration_ns)}"
                if s.duration_ns is not None and not s.lower_bound
                else f"{s.state} {_state_time(s)}"
                for s in life.states
            ]
        )
        where = ""
        if self.places is not None:
            where = self._where(life.netns, life.cgroup_id, life.pid)
        return f"{stamp}{owner}{where} {local:<{w}} {remote:<{w}} {total:>10}  {states}"

    def record_line(self, ev: Event, record) -> str:  # record: events.Life
        """line() of a connection straight from the kernel's record, as the Lifetime
        made of it would print, for less: what sockets/lifetimes.Lifetimes hands on as
        (closing Event, record) when the connection is whole (born traced, closed, at
        most LIFE_VISITS states)."""
        return self._record_line((ev, record))

    def _record_line(self, item: tuple) -> str:
        """record_line of a (closing Event, record) pair. The per-connection path at
        churn: cached address and port texts, the wall-clock second and the µs unit
        inline (each line has one churned ephemeral port, and four or five durations)."""
        ev, (_event, birth, visited, times, visits) = item
        (end, _d, _sk, cgroup_id, pid, flags, netns, _r, saddr, daddr, sport, dport, family,
         _old, _new, comm) = ev  # fmt: skip
        addrs, ports = self._addr_texts, self._port_texts
        local = (addrs.get((family, saddr)) or self._addr_text(family, saddr)) + (
            ports[sport] or self._port_text(sport)
        )
        remote = (addrs.get((family, daddr)) or self._addr_text(family, daddr)) + (
            ports[dport] or self._port_text(dport)
        )
        w = self.width
        if len(local) > w or len(remote) > w:
            self.width = w = wider(wider(w, local), remote)
        if not flags & F_OWNER_KNOWN:
            pid, comm = 0, b""
        owner = self._raw_owners.get((pid, comm)) or self._raw_owner(pid, comm)
        clock = self.clock
        if clock.style == TS_WALL:
            secs, frac = divmod(end + clock.offset_ns, NS_PER_S)
            if secs != self._sec:
                self._sec, self._sec_text = secs, clock.seconds_text(secs)
            stamp = f"{self._sec_text}.{frac // NS_PER_US:06d} "
        else:
            stamp = clock.format(end)
            stamp = f"{stamp} " if stamp else ""
        total = max(0, end - birth)
        # (format_duration's µs case inline: most durations at churn)
        if NS_PER_US <= total < NS_PER_MS:
            total = f"{total / NS_PER_US:.1f}µs"
        else:
            total = format_duration(total)
        if visits < LIFE_VISITS:
            visited = visited[:visits]
        named = _STATE_NAMES_SPACED
        states = "  ".join(
            [
                f"{named[state]}{ns / NS_PER_US:.1f}µs"
                if NS_PER_US <= ns < NS_PER_MS
                else named[state] + format_duration(ns)
                for state, ns in zip(visited, times)
            ]
        )
        where = ""
        if self.places is not None and (self.wide or netns != self.home_netns):
            where = self._where(netns, cgroup_id if pid else 0, pid)
        return f"{stamp}{owner}{where} {local:<{w}} {remote:<{w}} {total:>10}  {states}"

    def _where(self, netns: int, cgroup_id: int, pid: int) -> str:
        """The NETNS and CGROUP columns: with -w, or from a second namespace on
        ("" before; pid 0: no owner known)."""
        assert self.places is not None
        if not self.wide and netns:
            if self.home_netns and netns != self.home_netns:
                self.wide = True  # a second namespace: the columns from now on
            self.home_netns = self.home_netns or netns
        if not self.wide:
            return ""
        place = self.places.of(netns, cgroup_id, pid, bool(pid))
        return (
            f" {printable(place.netns_label):<{_NETNS_WIDTH}.{_NETNS_WIDTH}}"
            f" {keep_end(printable(place.cgroup_label), _CGROUP_WIDTH):<{_CGROUP_WIDTH}}"
        )

    def _addr_text(self, family: int, raw: bytes) -> str:
        if len(self._addr_texts) > _CACHE_MAX:
            self._addr_texts.clear()
        text = self._addr_texts[(family, raw)] = address_prefix(format_addr(family, raw))
        return text

    def _port_text(self, port: int) -> str:
        text = self._port_texts[port] = port_name(port, self.numeric)
        return text

    def _raw_owner(self, pid: int, comm: bytes) -> str:
        if len(self._raw_owners) > _CACHE_MAX:
            self._raw_owners.clear()
        text = self._raw_owners[(pid, comm)] = self._owner(pid, decode_comm(comm) if pid else "")
        return text

    def _lines(self, lives) -> list[str]:
        # a Lifetime, or (closing Event, kernel record) for record_line
        pair, line = self._record_line, self.line
        return [pair(item) if type(item) is tuple else line(item) for item in lives]

    def write_header(self) -> None:
        self.out.write(self.header() + "\n")
        self.headed = (self.width, self.wide)

    def write(self, lives) -> None:
        layout = (self.width, self.wide)
        lines = self._lines(lives)
        if (self.width, self.wide) != layout:
            lines = self._lines(lives)  # all at the new columns
        if lines:
            shown = len(lines)
            if self.headed not in (None, (self.width, self.wide)):
                lines.insert(0, self.header())
                self.headed = (self.width, self.wide)
            self.out.write("\n".join(lines) + "\n")
            self.printed += shown


def _state_time(s) -> str:  # s: lifetimes.StateTime
    if s.duration_ns is None:
        return "?"
    text = format_duration(s.duration_ns)
    return ">=" + text if s.lower_bound else text


def format_snapshot(
    rows, numeric: bool = False, extended: bool = False, places: Places | None = None
) -> str:
    """The socket table at one moment, in the spirit of `ss -tpe`: rows are snapshot.SnapshotRow.

    With places, the NETNS and CGROUP columns follow the owner."""
    ends = [
        (
            endpoint_text(r.entry.local_addr, r.entry.local_port, numeric),
            endpoint_text(r.entry.remote_addr, r.entry.remote_port, numeric),
        )
        for r in rows
    ]
    w = max([_ENDPOINT_WIDTH, *(len(x) for pair in ends for x in pair)])
    head = f"{'STATE':<12}{'LOCAL':<{w}} {'REMOTE':<{w}} {'PID':>7} {'COMM':<15}"
    if places is not None:
        head += f" {'NETNS':<{_NETNS_WIDTH}} {'CGROUP':<{_CGROUP_WIDTH}}"
    if extended:
        head += f" {'UID':>6} {'INODE':>10}"
    lines = [head.rstrip()]
    for row, (local, remote) in zip(rows, ends):
        pid, comm = _owner_columns(*(row.owner or (0, "")))
        line = f"{state_name(row.entry.state):<12}{local:<{w}} {remote:<{w}} {pid:>7} {comm:<15.15}"
        if places is not None:
            owner_pid = row.owner.pid if row.owner else 0
            place = places.of(row.netns, 0, owner_pid, bool(owner_pid))
            line += (
                f" {printable(place.netns_label):<{_NETNS_WIDTH}.{_NETNS_WIDTH}}"
                f" {keep_end(printable(place.cgroup_label), _CGROUP_WIDTH):<{_CGROUP_WIDTH}}"
            )
        if extended:
            line += f" {row.entry.uid:>6} {row.entry.inode:>10}"
        lines.append(line.rstrip())
    return "\n".join(lines) + "\n"
