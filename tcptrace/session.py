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
from tcptrace.stats import Summary
from tcptrace.tracer import Stage, StopConditions, Tracer


@dataclass
class Options:
    filters: Filters = field(default_factory=Filters)
    numeric: bool = False
    timestamp: str = "wall"
    count: int | None = None
    duration: float | None = None
    quiet: bool = False
    buffer_pages: int = 1024


class TextOutput(Stage):
    """Per-transition lines, then the summary table, on a text stream."""

    def __init__(self, out: TextIO, options: Options) -> None:
        self.out = out
        self.quiet = options.quiet
        self.formatter = TextFormatter(out, Clock.now(options.timestamp), numeric=options.numeric)

    def on_start(self) -> None:
        if not self.quiet:
            self.formatter.write_header()
            self.out.flush()

    def on_events(self, events: list[Event]) -> None:
        if not self.quiet:
            self.formatter.write(events)
            self.out.flush()

    def on_finish(self, summary: Summary) -> None:
        if not self.quiet:
            self.out.write("\n")
        printed = None if self.quiet else self.formatter.printed
        self.out.write(format_summary(summary, printed))
        self.out.flush()


def build_stages(options: Options, out: TextIO) -> list[Stage]:
    return [TextOutput(out, options)]


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
        tracer = Tracer(
            probe, build_stages(options, out), StopConditions(options.count, options.duration)
        )
        tracer.install_signals()
        err.write(f"tracing {options.filters.describe()} ... Ctrl-C to stop\n")
        err.flush()
        tracer.run()
    except BrokenPipeError:
        # the reader went away (| head): leave quietly, without a traceback at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        return 0
    except KeyboardInterrupt:
        raise TcptraceError("interrupted twice: stopped without a summary") from None
    finally:
        probe.close()
    return 0
