"""The command line: parse options, then hand over to the library."""

from __future__ import annotations

import socket
import sys

import click

from tcptrace import __version__
from tcptrace.errors import TcptraceError
from tcptrace.filters import Filters, parse_ports, parse_states
from tcptrace.output import TIMESTAMP_STYLES, TS_WALL
from tcptrace.states import TcpState


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
            names = ", ".join(s.name for s in TcpState)
            self.fail(f"{exc} (known: {names})", param, ctx)


def _union(values: tuple[frozenset, ...]) -> frozenset:
    return frozenset().union(*values) if values else frozenset()


EPILOG = """\b
Examples:
  tcptrace --port 443                 every transition of sockets on port 443
  tcptrace --port 80,443 --port 8000-8100 -n
  tcptrace --remote-port 5432 --state SYN_SENT   slow or hanging connects to PostgreSQL
  tcptrace -6 --count 100             the next 100 IPv6 transitions
  tcptrace --quiet --duration 60      one minute of per-state statistics only
"""


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
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
    "-s",
    "--state",
    "states",
    multiple=True,
    type=StatesType(),
    help="Show only transitions into or out of these states: SYN_SENT,TIME_WAIT. Repeatable.",
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
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many transitions.",
)
@click.option(
    "-d",
    "--duration",
    type=click.FloatRange(min=0, min_open=True),
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
    "--buffer-pages",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Perf buffer size per CPU, in pages (rounded up to a power of two).",
)
@click.version_option(__version__)
def main(**opts: object) -> None:
    """Show every TCP state transition live, with the time spent in the state it left.

    Prints one line per transition of the matching sockets and, at exit (Ctrl-C,
    SIGTERM, --count or --duration), how long sockets stayed in each state.
    """
    if opts["ipv4"] and opts["ipv6"]:
        raise click.UsageError("-4 and -6 exclude each other")
    family = socket.AF_INET if opts["ipv4"] else socket.AF_INET6 if opts["ipv6"] else 0
    filters = Filters(
        ports=_union(opts["ports"]),
        local_ports=_union(opts["local_ports"]),
        remote_ports=_union(opts["remote_ports"]),
        family=family,
        states=_union(opts["states"]),
    )
    from tcptrace.session import Options, run

    options = Options(
        filters=filters,
        numeric=bool(opts["numeric"]),
        timestamp=str(opts["timestamp"]),
        count=opts["count"],
        duration=opts["duration"],
        quiet=bool(opts["quiet"]),
        buffer_pages=_power_of_two(int(opts["buffer_pages"])),
    )
    try:
        code = run(options)
    except TcptraceError as exc:
        click.echo(f"tcptrace: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(code)


def _power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()
