"""The command line: parse options, then hand over to the library."""

from __future__ import annotations

import math
import os
import socket
import sys
from typing import Callable, NoReturn

import click
from click.core import ParameterSource

from tcptrace import __version__, startup
from tcptrace.errors import EXIT_INTERRUPTED, TcptraceError
from tcptrace.filters import (
    JUDGED_STATES,
    MAX_DURATION,
    MAX_DURATION_NS,
    Filters,
    merge_state_durations,
    parse_comm,
    parse_pid,
    parse_ports,
    parse_slower_than,
    parse_state_durations,
    parse_states,
)
from tcptrace.outputs.output import TIMESTAMP_STYLES, TS_WALL
from tcptrace.states import TcpState

# Perf buffer pages per CPU: 65536 pages is 256 MiB per CPU, far past any need.
MAX_BUFFER_PAGES = 1 << 16
DEFAULT_MAX_SOCKETS = 65536
MIN_SOCKETS = 64
# The per-socket map is an LRU hash that preallocates every entry (~100 bytes each).
MAX_SOCKETS_LIMIT = 1 << 22
# Set to get Python's traceback instead of the one-line internal error.
DEBUG_ENV = "TCPTRACE_DEBUG"
# The kernel checks at most this many --cgroup filters (MAX_CGROUP_FILTERS in the program).
MAX_CGROUP_FILTERS = 8
# Scheduling priority while printing events, unless --nice or --max-cpu says otherwise.
DEFAULT_NICE = -10
# Shortest --interval: each frame reads every kernel map (NSTATES x 512 histogram
# slots per CPU); shorter intervals would spin the CPU and starve signal handling.
MIN_INTERVAL = 0.05


class PortsType(click.ParamType):
    name = "PORTS"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, frozenset):
            return value
        try:
            return parse_ports(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class StatesType(click.ParamType):
    name = "STATES"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, frozenset):
            return value
        try:
            return parse_states(str(value))
        except ValueError as exc:
            names = ", ".join(s.name for s in TcpState if s != TcpState.NEW_SYN_RECV)
            self.fail(f"{exc} (known: {names})", param, ctx)

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str):
        # complete the last item of a comma list: SYN_SENT,TI<TAB> -> SYN_SENT,TIME_WAIT
        head, _, last = incomplete.rpartition(",")
        prefix = f"{head}," if head else ""
        return [
            click.shell_completion.CompletionItem(prefix + state.name)
            for state in TcpState
            if state.name.startswith(last.upper())
        ]


class ParsedType(click.ParamType):
    """A value checked by one of the library's parsers (ValueError: a usage error)."""

    def __init__(self, name: str, parse) -> None:
        self.name = name
        self.parse = parse

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if not isinstance(value, str):
            return value
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class StateDurationsType(ParsedType):
    """[STATE=]DUR lists (--slower-than); completes the state of the last item."""

    def shell_complete(self, ctx: click.Context, param: click.Parameter, incomplete: str):
        head, _, last = incomplete.rpartition(",")
        if "=" in last:
            return []  # a duration: nothing to offer
        prefix = f"{head}," if head else ""
        return [
            click.shell_completion.CompletionItem(f"{prefix}{state.name}=")
            for state in JUDGED_STATES
            if state.name.startswith(last.upper())
        ]


def _resolved(flag: str, values: object, resolve: Callable[[str], object]) -> list:
    """--netns and --cgroup values, resolved once the mode is known (on this host, or
    as a capture recorded them)."""
    out = []
    for text in values:  # type: ignore[attr-defined]
        try:
            out.append(resolve(str(text)))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint=f"'{flag}'") from None
    return out


def _replay_netns(text: str) -> int | str:
    """-r --netns: the inode or ip netns name a capture recorded (its NETNS column),
    not this host's."""
    if text.isdigit():
        return int(text)
    if not text or "/" in text:
        raise ValueError(
            f"{text!r}: with -r, an ip netns name or inode number as the capture recorded "
            "it (its NETNS column)"
        )
    return text


def _replay_cgroup(text: str):
    """-r --cgroup: a path as the capture recorded it (relative to the cgroup2 mount)."""
    from tcptrace.filters import CgroupFilter

    path = "/" + os.path.normpath("/" + text).strip("/")
    return CgroupFilter(path=path, id=0, level=0 if path == "/" else path.count("/"))


def _netns(text: str) -> int:
    from tcptrace.sockets.namespaces import resolve

    return resolve(text)


def _cgroup(text: str):
    from tcptrace.sockets.cgroups import resolve_filter

    return resolve_filter(text)


class ListenAddressType(click.ParamType):
    name = "[ADDR:]PORT"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        from tcptrace.outputs.metrics import ListenAddress, parse_listen_address

        if isinstance(value, ListenAddress):
            return value
        try:
            return parse_listen_address(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class FiniteSeconds(click.ParamType):
    """A positive, finite number of seconds ('inf' and 'nan' are floats, not durations)."""

    name = "SECONDS"

    def __init__(self, minimum: float = 0.0) -> None:
        self.minimum = minimum  # smallest value allowed (> 0 when set)

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, float):
            return value
        try:
            seconds = float(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{value!r} is not a positive, finite number of seconds", param, ctx)
        if seconds * 1e9 > MAX_DURATION_NS:
            self.fail(f"{value!r} is longer than {MAX_DURATION}", param, ctx)
        if seconds < self.minimum:
            self.fail(f"{value!r} is below the shortest interval, {self.minimum:g} s", param, ctx)
        return seconds


class Percent(click.ParamType):
    """A finite share of one CPU, in percent (click's FloatRange lets 'nan' through)."""

    name = "PERCENT"

    def __init__(self, low: float, high: float) -> None:
        self.low, self.high = low, high

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None):
        if isinstance(value, float):
            return value
        try:
            percent = float(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a number (a percentage)", param, ctx)
        if not self.low <= percent <= self.high:  # False for nan too
            self.fail(f"{value!r} is not in the range {self.low:g}-{self.high:g}", param, ctx)
        return percent


# -C/--file-size: a byte count with an optional binary suffix
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MIN_FILE_SIZE = 1 << 10


def parse_size(text: str) -> int:
    """-C's SIZE: bytes, or k, M, G (KiB, MiB, GiB): 100M."""
    value = text.strip()
    unit = value[-1:].lower() if value[-1:].isalpha() else ""
    number = value[: len(value) - len(unit)]
    if unit not in SIZE_UNITS or not number.isdigit():
        raise ValueError(f"{text!r} is not a size (bytes, or with k, M or G: 100M)")
    size = int(number) * SIZE_UNITS[unit]
    if size < MIN_FILE_SIZE:
        raise ValueError(f"{text!r} is below the smallest file size, 1k")
    return size


def _union(values: tuple[frozenset, ...]) -> frozenset:
    return frozenset().union(*values) if values else frozenset()


EPILOG = """\b
Examples:
  tcptrace --port 443                 every transition of sockets on port 443
  tcptrace --port 80,443 --port 8000-8100 -n
  tcptrace --remote-port 5432 --state SYN_SENT   slow or hanging connects to PostgreSQL
  tcptrace -6 --count 100             the next 100 IPv6 transitions
  tcptrace -4 -p 22 -T relative       IPv4 SSH, seconds since start
  tcptrace --quiet --duration 60      one minute of per-state statistics only
  tcptrace --quiet --hist -p 443      at exit, a log2 histogram of the time in each state
  tcptrace -L 8000-8100 -D 443 -T iso --count 50 --buffer-pages 256
  tcptrace --port 443 --json | jq .   one JSON object per transition, then a summary
  tcptrace --port 443 --csv > t.csv   a CSV header and rows (summary on stderr)
  tcptrace --quiet --metrics 9876     Prometheus exporter on 127.0.0.1:9876, no lines
  tcptrace --metrics 0.0.0.0:9876     metrics for the whole network, and the lines
  tcptrace --interval 2               a per-state table every 2 s, like top
  tcptrace --interval 1 --no-color    the same without colour (NO_COLOR=1 too)
  tcptrace --slower-than 1s           only transitions that left a state after 1 s or more
  tcptrace --slower-than SYN_SENT=100ms,ESTABLISHED=5s   slow connects, long connections
  tcptrace --lifetime --port 5432     one line per finished connection (like tcplife)
  tcptrace --snapshot -l -n -e        listening sockets now, with owners (like ss -tlpen)
  tcptrace --quiet --max-sockets 1048576   a busy server: room for 1M sockets in the kernel
  tcptrace --max-cpu 20 > t.log       at most a fifth of a CPU; the kernel sheds the rest
  tcptrace --nice 0 --port 443        keep your own scheduling priority
  tcptrace --netns blue -p 80         sockets of the ip netns "blue" only (name, path or inode)
  tcptrace --cgroup /system.slice/nginx.service   sockets owned by nginx's unit and below
  tcptrace --pid 4242                 sockets owned by process 4242
  tcptrace --comm curl --comm wget    sockets owned by curl or wget processes
  tcptrace -w --json | jq .netns_name   every line with its namespace and cgroup columns
  tcptrace --stuck CLOSE_WAIT=30s     a report per socket in CLOSE_WAIT for over 30 s
  tcptrace --stuck 5s -p 443 --json   a watchdog: JSON records of sockets stuck over 5 s
  tcptrace --interval 2 --stuck SYN_SENT=1s   the live table with OLDEST and STUCK
  tcptrace --check                    what this kernel lets tcptrace do (run it first)
  tcptrace --write t.cap -p 443       save the transitions to a capture (summary on stderr)
  tcptrace --write - | ssh host 'cat > t.cap'   a capture over the network
  tcptrace --write /var/tmp/t.cap -C 10M --file-count 3   a flight recorder: the last 30 MiB
  tcptrace -r t.cap --json            replay a capture as it would print live (no root)
  tcptrace -r '/var/tmp/t.cap*' --slower-than 100ms --hist   the slow ones of every file

\b
Shell completion (bash; zsh and fish alike):
  eval "$(_TCPTRACE_COMPLETE=bash_source tcptrace)"
"""


def _nice(nice: object, max_cpu: object) -> int | None:
    """The priority to print at: --nice, else DEFAULT_NICE unless --max-cpu caps the reader.

    A capped reader puts the workload first: raised above it, the reader's every
    wake-up preempts the workload's threads, maybe one holding a socket's lock,
    which cost a lock-bound churn up to 30% even at 10% of a CPU (BENCHMARKS.md).
    """
    if nice is not None:
        return int(nice)
    return None if max_cpu is not None else DEFAULT_NICE


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
# the words after -r FILE: more captures (an unquoted glob: -r t.cap*); nothing else
# takes words (main refuses them)
@click.argument("files", nargs=-1, metavar="[-r FILE...]")
@click.option(
    "-p",
    "--port",
    "ports",
    multiple=True,
    type=PortsType(),
    help="Trace sockets with this port at either end: 443, 80,443 or 8000-8100. Repeatable.",
)
@click.option(
    "-L",
    "--local-port",
    "local_ports",
    multiple=True,
    type=PortsType(),
    help="Trace sockets with this local port (list or range). Repeatable.",
)
@click.option(
    "-D",
    "--remote-port",
    "remote_ports",
    multiple=True,
    type=PortsType(),
    help="Trace sockets with this remote port (list or range). Repeatable.",
)
@click.option("-4", "--ipv4", "ipv4", is_flag=True, help="IPv4 only.")
@click.option("-6", "--ipv6", "ipv6", is_flag=True, help="IPv6 only.")
@click.option(
    "--netns",
    "netns",
    multiple=True,
    metavar="NETNS",
    help="Sockets of this network namespace: an ip netns name, a /proc/PID/ns/net path "
    "or an inode number (lsns -t net); with -r, a name or inode as the capture recorded "
    "it. Repeatable.",
)
@click.option(
    "--cgroup",
    "cgroups",
    multiple=True,
    metavar="PATH",
    help="Sockets whose owner runs in this cgroup v2 directory or below: "
    "/system.slice/nginx.service. Repeatable.",
)
@click.option(
    "--pid",
    "pids",
    multiple=True,
    type=ParsedType("PID", parse_pid),
    help="Sockets owned by this process. Repeatable.",
)
@click.option(
    "--comm",
    "comms",
    multiple=True,
    type=ParsedType("NAME", parse_comm),
    help="Sockets owned by a process of this command name (ps -o comm). Repeatable.",
)
@click.option(
    "-w",
    "--wide",
    is_flag=True,
    help="Always show the NETNS and CGROUP columns (by default they appear, under a "
    "new header, with the first transition of a second network namespace).",
)
@click.option(
    "-s",
    "--state",
    "states",
    multiple=True,
    type=StatesType(),
    help="Show only transitions into or out of these states: SYN_SENT,TIME_WAIT. Repeatable.",
)
@click.option(
    "--slower-than",
    "slower_than",
    multiple=True,
    type=StateDurationsType("[STATE=]DUR", parse_slower_than),
    help="Show only transitions that left a state after at least DUR (100ms, 2s, 1.5m), "
    "decided in the kernel. Per state: SYN_SENT=100ms,ESTABLISHED=5s; a bare DUR covers "
    "the states not named (without one, they are not shown). Repeatable, later items win. "
    "The summary still counts every transition.",
)
@click.option("-n", "--numeric", is_flag=True, help="Numeric ports, no service names (as ss -n).")
@click.option(
    "-T",
    "--timestamp",
    type=click.Choice(TIMESTAMP_STYLES),
    default=TS_WALL,
    show_default=True,
    help="Time column: wall clock, seconds since start, ISO 8601 UTC, or none.",
)
@click.option(
    "-c",
    "--count",
    type=click.IntRange(min=1, max=2**63 - 1),
    default=None,
    help="Stop after this many transitions (with --lifetime: finished connections).",
)
@click.option(
    "-d",
    "--duration",
    type=FiniteSeconds(),
    default=None,
    help="Stop after this many seconds.",
)
@click.option(
    "-q",
    "--quiet",
    is_flag=True,
    help="No per-transition output: count in the kernel, print the summary at exit.",
)
@click.option(
    "--hist",
    is_flag=True,
    help="At exit, after the summary: per state, a log2 histogram of the time sockets "
    "spent in it (buckets, counts, bars, as bcc's tools print); with --json, in the "
    "summary object.",
)
@click.option(
    "--buffer-pages",
    type=click.IntRange(min=1, max=MAX_BUFFER_PAGES),
    default=None,
    help="Perf buffer size per CPU, in pages (rounded up to a power of two). "
    "Default: 64 MiB shared by the CPUs, 1 to 16 MiB each.",
)
@click.option(
    "--nice",
    type=click.IntRange(-20, 19),
    default=None,
    help="Scheduling priority while printing events, so a busy machine cannot starve "
    f"the reader into losing events (never lowers the current priority). Default: "
    f"{DEFAULT_NICE}, or unchanged with --max-cpu.",
)
@click.option(
    "--max-cpu",
    type=Percent(1, 100),
    default=None,
    metavar="PERCENT",
    help="Cap the reader at this share of one CPU; events that do not fit are shed "
    "in the kernel and counted as lost (statistics stay exact). Default: no cap.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per transition (schema in the README), then a summary object.",
)
@click.option(
    "--csv",
    "as_csv",
    is_flag=True,
    help="CSV: a header, then one row per transition; the summary goes to stderr.",
)
@click.option(
    "--metrics",
    type=ListenAddressType(),
    default=None,
    help="Serve Prometheus metrics on [ADDR:]PORT (ADDR defaults to 127.0.0.1): 9876, "
    "0.0.0.0:9876, [::1]:9876.",
)
@click.option(
    "-i",
    "--interval",
    type=FiniteSeconds(minimum=MIN_INTERVAL),
    default=None,
    help=f"Instead of lines, a per-state table every this many seconds: 2 or 0.5 "
    f"(at least {MIN_INTERVAL:g}).",
)
@click.option(
    "--no-color",
    is_flag=True,
    help="No colour in the --interval table (also NO_COLOR=1; never colour in a pipe).",
)
@click.option(
    "--lifetime",
    is_flag=True,
    help="One line per finished connection (like tcplife): owner, lifetime, time in each state.",
)
@click.option(
    "--stuck",
    "stuck",
    multiple=True,
    type=ParsedType("DUR|STATE=DUR", parse_state_durations),
    help="Report each socket once it has been in its state longer than DUR (100ms, 30s, "
    "1.5m), or per state: CLOSE_WAIT=30s,SYN_SENT=2s; the kernel finds them. Prints these "
    "reports instead of transitions, and what is still stuck at exit; with -r, by the "
    "capture's clock. Repeatable.",
)
@click.option(
    "--snapshot",
    is_flag=True,
    help="Print the matching TCP sockets and their owners once, then exit (like ss -tpe).",
)
@click.option(
    "-l", "--listening", is_flag=True, help="With --snapshot: listening sockets only (ss -l)."
)
@click.option(
    "-e", "--extended", is_flag=True, help="With --snapshot: add uid and inode columns (ss -e)."
)
@click.option(
    "--max-sockets",
    type=click.IntRange(min=MIN_SOCKETS, max=MAX_SOCKETS_LIMIT),
    default=DEFAULT_MAX_SOCKETS,
    show_default=True,
    help="Capacity of the kernel's per-socket map (LRU: beyond it the least recently "
    "active sockets are evicted, counted in the summary, and their next transition is UNTIMED).",
)
@click.option(
    "--write",
    "write",
    metavar="FILE",
    default=None,
    help="Save the transitions to a capture file (- for standard output) instead of "
    "printing them: the kernel's records with their owners, places and TIME_WAIT "
    "ends, read back by -r. The summary goes to stderr. -w is --wide, not this.",
)
@click.option(
    "-C",
    "--file-size",
    "file_size",
    type=ParsedType("SIZE", parse_size),
    default=None,
    help="With --write: start a new file (FILE.000001, ...) once a file reaches SIZE "
    "bytes: 100M, 512k, 1G (as tcpdump -C).",
)
@click.option(
    "--file-count",
    "file_count",
    type=click.IntRange(min=1),
    default=None,
    help="With -C: keep the last N files only, deleting older ones (a flight recorder).",
)
@click.option(
    "-r",
    "--read",
    "read",
    multiple=True,
    metavar="FILE",
    help="Replay captures (--write) instead of tracing, with any output and filter: "
    "- for standard input, several files or a quoted glob ('t.cap*'), read in time "
    "order. Needs no root. Repeatable.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Print what this kernel lets tcptrace do, one line per feature (the tracepoint, "
    "BTF, the map scan, the nested program, cgroups, the perf buffer, headers, versions, "
    "lockdown) and what is degraded, then exit: 0 when tracing works, 1 when not. "
    "Takes no other option.",
)
@click.version_option(__version__)
def main(**opts: object) -> None:
    """Show every TCP state transition live, with the time spent in the state it left.

    Prints one line per transition of the matching sockets and, at exit (Ctrl-C,
    SIGTERM, --count or --duration), how long sockets stayed in each state.
    """
    if opts["check"]:
        others = _given_options(but="check")
        if others:
            raise click.UsageError(f"--check takes no other option ({others[0]} given)")
        from tcptrace.session import check

        _finish(check)
    if opts["ipv4"] and opts["ipv6"]:
        raise click.UsageError("-4 and -6 exclude each other")
    _more_captures(opts)
    _check_capture_options(opts)
    if opts["as_json"] and opts["as_csv"]:
        raise click.UsageError("--json and --csv exclude each other")
    fmt = "json" if opts["as_json"] else "csv" if opts["as_csv"] else "text"
    if opts["interval"] is not None and fmt != "text":
        raise click.UsageError(f"--interval prints a table: it excludes --{fmt}")
    if opts["count"] is not None and (
        opts["quiet"] or opts["interval"] is not None or opts["stuck"]
    ):
        # no per-transition stream to count: the run would never stop by itself
        which = "--quiet" if opts["quiet"] else "--interval" if opts["interval"] else "--stuck"
        raise click.UsageError(f"--count counts transitions shown: {which} shows none")
    _refuse_ignored(opts)
    stuck = _stuck_thresholds(opts["stuck"])
    for flag in ("listening", "extended"):
        if opts[flag] and not opts["snapshot"]:
            raise click.UsageError(f"--{flag} goes with --snapshot")
    streams = {"lifetime": opts["lifetime"], "quiet": opts["quiet"], "json": opts["as_json"],
               "csv": opts["as_csv"], "interval": opts["interval"] is not None,
               "metrics": opts["metrics"] is not None, "stuck": bool(opts["stuck"]),
               "hist": opts["hist"]}  # fmt: skip
    for flag, given in streams.items():
        if given and opts["snapshot"]:
            raise click.UsageError(f"--{flag} and --snapshot exclude each other")
    for flag in ("quiet", "csv", "interval", "stuck"):
        # lifetimes are text lines or JSON records; a CSV table has transition columns
        if opts["lifetime"] and streams[flag]:
            raise click.UsageError(f"--lifetime and --{flag} exclude each other")
    if opts["stuck"] and not opts["slower_than"] and _given("states"):
        raise click.UsageError("--state selects transitions: --stuck alone shows none")
    if opts["stuck"] and opts["as_csv"]:
        raise click.UsageError("--stuck reports are not transitions: use --json, not --csv")
    if opts["lifetime"] and opts["slower_than"]:
        raise click.UsageError(
            "--slower-than selects transitions: --lifetime shows connections, not transitions"
        )
    replay = bool(opts["read"])
    family = socket.AF_INET if opts["ipv4"] else socket.AF_INET6 if opts["ipv6"] else 0
    namespaces = _resolved("--netns", opts["netns"], _replay_netns if replay else _netns)
    filters = Filters(
        ports=_union(opts["ports"]),
        local_ports=_union(opts["local_ports"]),
        remote_ports=_union(opts["remote_ports"]),
        family=family,
        states=_union(opts["states"]),
        netns=frozenset(n for n in namespaces if isinstance(n, int)),
        netns_names=frozenset(n for n in namespaces if isinstance(n, str)),
        pids=frozenset(opts["pids"]),
        comms=frozenset(opts["comms"]),
        cgroups=tuple(
            dict.fromkeys(
                _resolved("--cgroup", opts["cgroups"], _replay_cgroup if replay else _cgroup)
            )
        ),
        slower_than=tuple(merge_state_durations(opts["slower_than"]).items()),
    )
    if len(filters.cgroups) > MAX_CGROUP_FILTERS:
        raise click.UsageError(f"at most {MAX_CGROUP_FILTERS} --cgroup filters")
    from tcptrace.session import Options, run

    options = Options(
        filters=filters,
        numeric=bool(opts["numeric"]),
        timestamp=str(opts["timestamp"]),
        count=opts["count"],
        duration=opts["duration"],
        quiet=bool(opts["quiet"]),
        buffer_pages=None
        if opts["buffer_pages"] is None
        else _power_of_two(int(opts["buffer_pages"])),
        nice=_nice(opts["nice"], opts["max_cpu"]),
        max_cpu=None if opts["max_cpu"] is None else float(opts["max_cpu"]) / 100,
        format=fmt,
        interval=opts["interval"],
        metrics=opts["metrics"],
        no_color=bool(opts["no_color"]),
        lifetime=bool(opts["lifetime"]),
        snapshot=bool(opts["snapshot"]),
        listening=bool(opts["listening"]),
        extended=bool(opts["extended"]),
        max_sockets=int(opts["max_sockets"]),
        wide=bool(opts["wide"]),
        hist=bool(opts["hist"]),
        stuck=stuck,
        # --stuck alone prints its reports only; with --slower-than, the slow lines too
        transitions=not stuck or bool(opts["slower_than"]),
        write=opts["write"],
        file_size=opts["file_size"],
        file_count=opts["file_count"],
        read=tuple(opts["read"]),
    )
    _finish(lambda: run(options))


# What --write refuses: (parameter name, how it is written, why)
_NOT_WITH_WRITE = (
    ("lifetime", "--lifetime", "a capture holds transitions (replay it with -r FILE --lifetime)"),
    ("interval", "--interval", "a capture holds transitions, not tables"),
    ("snapshot", "--snapshot", "a capture holds transitions"),
    ("as_json", "--json", "the capture is the output (replay it with -r FILE --json)"),
    ("as_csv", "--csv", "the capture is the output (replay it with -r FILE --csv)"),
    ("quiet", "--quiet", "a capture holds the transitions --quiet does not stream"),
    ("stuck", "--stuck", "a capture holds transitions"),
)
# What shapes printed lines only: no effect on a capture (a replay's choice)
_LINES_ONLY = (("numeric", "--numeric"), ("wide", "--wide"), ("timestamp", "--timestamp"))
# What -r refuses: options that need the live kernel
_NEEDS_KERNEL = (
    ("interval", "--interval"),
    ("metrics", "--metrics"),
    ("snapshot", "--snapshot"),
    ("max_cpu", "--max-cpu"),
    ("nice", "--nice"),
    ("buffer_pages", "--buffer-pages"),
    ("max_sockets", "--max-sockets"),
    ("write", "--write"),
)


def _more_captures(opts: dict[str, object]) -> None:
    """Words after the options are more files for -r (tcptrace -r t.cap*), else an error;
    tcpdump's habit, -w FILE, is told that -w is --wide here."""
    files = tuple(opts.pop("files"))  # type: ignore[arg-type]
    if not files:
        return
    if not opts["read"]:
        if opts["wide"]:
            raise click.UsageError(
                "-w is --wide (as in tcpstates): to write a capture file, use --write FILE"
            )
        raise click.UsageError(f"Got unexpected extra argument ({' '.join(files)})")
    opts["read"] = (*opts["read"], *files)  # type: ignore[misc]


def _check_capture_options(opts: dict[str, object]) -> None:
    """--write, -C, --file-count and -r: what goes with what (usage errors, exit 2)."""
    write, read = opts["write"], opts["read"]
    if opts["file_size"] is not None and write is None:
        raise click.UsageError("-C/--file-size goes with --write")
    if opts["file_count"] is not None and opts["file_size"] is None:
        raise click.UsageError("--file-count needs -C/--file-size (files to count)")
    if write is not None:
        for name, flag, why in _NOT_WITH_WRITE:
            if _given(name):
                raise click.UsageError(f"--write and {flag} exclude each other: {why}")
        for name, flag in (
            ("numeric", "--numeric"),
            ("wide", "--wide"),
            ("timestamp", "--timestamp"),
        ):
            if _given(name):  # they shape printed lines: a replay's choice
                raise click.UsageError(f"{flag} has no effect with --write (give it to -r)")
        if write == "-" and opts["file_size"] is not None:
            raise click.UsageError("-C/--file-size rotates files: not with --write -")
        if write == "-" and sys.stdout.isatty():
            raise click.UsageError(
                "--write -: standard output is a terminal; redirect it (> t.cap, | ssh ...)"
            )
    if read:
        for name, flag in _NEEDS_KERNEL:
            if _given(name):
                raise click.UsageError(f"{flag} needs the live kernel: not with -r/--read")
        if "-" in read and sys.stdin.isatty():
            raise click.UsageError("-r -: standard input is a terminal, not a capture")


def _finish(run: Callable[[], int]) -> NoReturn:
    """Run the library's part and exit with its code; a problem it names is one line."""
    try:
        code = run()
    except TcptraceError as exc:
        click.echo(f"tcptrace: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        # Ctrl-C before tracing started (while the program compiles): nothing to summarise
        # (the command's own handler, startup.install_early_signals, exits before this)
        click.echo(startup.INTERRUPTED, err=True)
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:
        if exc.errno not in startup.OUTPUT_ERRNOS:
            raise _internal_error(exc) from None
        sys.exit(startup.output_failed(exc, sys.stdout, sys.stderr))
    except Exception as exc:
        raise _internal_error(exc) from None
    sys.exit(code)


def _internal_error(exc: Exception) -> BaseException:
    """A bug: still one line, and the traceback on demand."""
    if os.environ.get(DEBUG_ENV):
        return exc
    click.echo(
        f"tcptrace: internal error: {type(exc).__name__}: {exc} "
        f"(a bug: {DEBUG_ENV}=1 shows the traceback for a report)",
        err=True,
    )
    return SystemExit(1)


def _given_options(but: str) -> list[str]:
    """The options on the command line (their long names), except `but`."""
    command = click.get_current_context().command
    return [
        max(param.opts, key=len)
        for param in command.params
        if isinstance(param, click.Option) and param.name != but and _given(str(param.name))
    ]


def _given(name: str) -> bool:
    """Whether an option was on the command line (not its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT)


# Options that have no effect in a mode, refused rather than silently ignored:
# (mode's option name, option's parameter name, how it is written)
_NO_EFFECT = (
    ("snapshot", "count", "--count"),
    ("snapshot", "duration", "--duration"),
    ("snapshot", "timestamp", "--timestamp"),
    ("interval", "states", "--state"),
    ("interval", "numeric", "--numeric"),
    ("interval", "timestamp", "--timestamp"),
    # it selects the lines; both modes print none
    ("quiet", "slower_than", "--slower-than"),
    ("interval", "slower_than", "--slower-than"),
    ("snapshot", "slower_than", "--slower-than"),
)


def _refuse_ignored(opts: dict[str, object]) -> None:
    modes = {
        "snapshot": bool(opts["snapshot"]),
        "interval": opts["interval"] is not None,
        "quiet": bool(opts["quiet"]),
    }
    for mode, name, flag in _NO_EFFECT:
        if modes[mode] and _given(name):
            raise click.UsageError(f"{flag} has no effect with --{mode}")


def _stuck_thresholds(values: tuple[dict[int, int], ...]) -> dict[int, int]:
    """--stuck's values, merged, as {state: ns}; a state nobody can be stuck in is a
    usage error."""
    from tcptrace.sockets.stuck import thresholds

    try:
        return thresholds(merge_state_durations(values))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--stuck'") from None


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()
