"""One tracing session: checks, load, loop, summary. What the command line runs."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TextIO

from tcptrace import preflight
from tcptrace.errors import TcptraceError
from tcptrace.events import Event
from tcptrace.filters import Filters
from tcptrace.output import Clock, TextFormatter, format_summary
from tcptrace.tracer import StopConditions, Tracer


@dataclass
class Options:
    filters: Filters = field(default_factory=Filters)
    numeric: bool = False
    timestamp: str = "wall"
    count: int | None = None
    duration: float | None = None
    quiet: bool = False
    buffer_pages: int = 1024


def run(options: Options, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Trace until a stop condition; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    preflight.run_all()
    from tcptrace.loader import Probe, ProbeConfig

    probe = Probe(
        ProbeConfig(
            filters=options.filters,
            emit_events=not options.quiet,
            buffer_pages=options.buffer_pages,
        )
    )
    try:
        return _trace(probe, options, out, err)
    finally:
        probe.close()


def _trace(probe, options: Options, out: TextIO, err: TextIO) -> int:
    formatter = TextFormatter(out, Clock.now(options.timestamp), numeric=options.numeric)

    def sink(events: list[Event]) -> None:
        formatter.write(events)
        out.flush()

    tracer = Tracer(probe, sink, StopConditions(options.count, options.duration))
    tracer.install_signals()
    try:
        if not options.quiet:
            formatter.write_header()
            out.flush()
        err.write(f"tracing {options.filters.describe()} ... Ctrl-C to stop\n")
        err.flush()
        tracer.run()
        out.write("\n" if not options.quiet else "")
        out.write(format_summary(probe.summary(), None if options.quiet else formatter.printed))
        out.flush()
    except BrokenPipeError:
        # the reader went away (| head): leave quietly, without a traceback at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        return 0
    except KeyboardInterrupt:
        raise TcptraceError("interrupted twice: stopped without a summary") from None
    return 0
