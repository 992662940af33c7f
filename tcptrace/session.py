"""One tracing session: checks, load, loop, summary. What the command line runs."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, TextIO

from tcptrace import startup
from tcptrace.errors import TcptraceError
from tcptrace.filters import Filters
from tcptrace.kernel import preflight
from tcptrace.kernel.events import F_STUCK, Event
from tcptrace.kernel.stats import Summary
from tcptrace.outputs.hist import format_hist
from tcptrace.outputs.losses import LossReport
from tcptrace.outputs.losses import advice as loss_advice
from tcptrace.outputs.output import (
    Clock,
    LifetimeFormatter,
    TextFormatter,
    format_snapshot,
    format_summary,
)
from tcptrace.sockets.places import Places
from tcptrace.sockets.sockdiag import Budget, SocketTables
from tcptrace.stages import Stage
from tcptrace.states import TcpState
from tcptrace.tracer import POLL_MS, QUIET_POLL_MS, EventSource, StopConditions, Tracer

if TYPE_CHECKING:
    from tcptrace.kernel.capfile import CaptureWriter, RotatingWriter
    from tcptrace.kernel.events import Life
    from tcptrace.outputs.metrics import ListenAddress
    from tcptrace.sockets.lifetimes import Lifetimes
    from tcptrace.sockets.stuck import CaptureStuck, Oldest, Scanner, StuckWatch

# Per-transition output formats (--json, --csv); text is the default.
FORMAT_TEXT = "text"


@dataclass
class Options:
    filters: Filters = field(default_factory=Filters)
    numeric: bool = False
    timestamp: str = "wall"
    count: int | None = None
    duration: float | None = None
    quiet: bool = False
    buffer_pages: int | None = None  # per CPU; None: loader.default_buffer_pages()
    # scheduling priority while printing events: a busy machine must not starve
    # the consumer into losing events (None leaves it unchanged)
    nice: int | None = -10
    # share of one CPU the reader may use for per-event output (None: unlimited)
    max_cpu: float | None = None
    # per-transition output: text, json (export.FORMAT_JSON) or csv (export.FORMAT_CSV)
    format: str = FORMAT_TEXT
    # --interval: seconds between live tables (no per-transition output then)
    interval: float | None = None
    # --metrics: serve Prometheus metrics here
    metrics: ListenAddress | None = None
    # --no-color (NO_COLOR in the environment does the same)
    no_color: bool = False

    # --stuck: {state: ns} thresholds (sockets/stuck.thresholds); empty: off
    stuck: dict[int, int] = field(default_factory=dict)
    # per-transition lines asked for: not with --stuck alone (only its reports)
    transitions: bool = True

    @property
    def emit_events(self) -> bool:
        """Whether the kernel streams events: the live table, --quiet and --stuck alone
        need only its maps."""
        return self.transitions and not (self.quiet or self.interval)

    @property
    def follows_closes(self) -> bool:
        """--quiet, the live table (with --metrics or not) and --stuck alone print no
        transitions, but their summary follows TIME_WAIT as the lines' does (one truth
        for all): the kernel streams only the ends that may be entries into TIME_WAIT."""
        return (
            not self.emit_events
            and not self.lifetime
            and bool(self.filters.show_mask & (1 << TcpState.TIME_WAIT))
        )

    @property
    def scan(self) -> bool:
        """Whether the kernel's socket map is scanned: --stuck, OLDEST, the gauges."""
        return bool(self.stuck) or bool(self.interval) or self.metrics is not None

    lifetime: bool = False  # one line per finished connection instead of per transition
    # --snapshot: print the socket table once and exit (-l listening only, -e extended)
    snapshot: bool = False
    listening: bool = False
    extended: bool = False
    # --max-sockets: capacity of the kernel's per-socket LRU map
    max_sockets: int = 65536
    # -w/--wide: the NETNS and CGROUP columns, whatever the host's namespaces
    wide: bool = False
    # --hist: each state's log2 histogram after the exit summary, on its stream
    hist: bool = False
    # --write FILE ("-": standard output): a capture instead of lines (outputs/capture.py);
    # -C/--file-size and --file-count rotate it
    write: str | None = None
    file_size: int | None = None
    file_count: int | None = None
    # -r/--read FILE...: replay captures instead of tracing (replay.py)
    read: tuple[str, ...] = ()
    # a replay's: the capture host's clock (its wall-clock offset and start) and the
    # places it recorded; None: this host's, now
    clock: Clock | None = None
    places: Places | None = None

    def make_clock(self) -> Clock:
        """The outputs' clock: a replay's capture host's, else this host's, now."""
        if self.clock is not None:
            return replace(self.clock)
        return Clock.now(self.timestamp)

    def make_places(self) -> Places:
        return self.places if self.places is not None else Places()


class TextOutput(Stage):
    """Per-transition lines, then the summary table, on a text stream."""

    def __init__(
        self,
        out: TextIO,
        options: Options,
        still_stuck: Callable[[], list[Event]] | None = None,
    ) -> None:
        self.out = out
        self.quiet = options.quiet
        self.hist = options.hist
        # transitions are printed (else "shown" has no meaning in the accounting)
        self.lines = options.emit_events
        # --stuck: its reports are printed, --quiet or not; what is still stuck at exit
        self.stuck = bool(options.stuck)
        self.still_stuck = still_stuck
        self.formatter = TextFormatter(
            out,
            options.make_clock(),
            numeric=options.numeric,
            places=None
            if options.quiet and not (options.stuck or still_stuck)
            else options.make_places(),
            wide=options.wide,
            # only stuck reports and the list at exit (the live table's too): their header
            stuck_only=(bool(options.stuck) or still_stuck is not None)
            and (options.quiet or not options.transitions),
        )

    def on_start(self) -> None:
        if not self.quiet or self.stuck:
            self.formatter.write_header()
            self.out.flush()

    def on_events(self, events: list[Event]) -> None:
        if events and events[0].flags & F_STUCK:
            # the stuck watch's own batch (sockets/stuck.StuckWatch.on_tick); under the
            # live table its counts are in the STUCK column instead
            if self.stuck:
                self.formatter.write(events, transitions=False)
                self.out.flush()
        elif self.lines:
            self.formatter.write(events)
            self.out.flush()

    def on_finish(self, summary: Summary) -> None:
        if not self.quiet or self.stuck:
            self.out.write("\n")
        if self.still_stuck is not None:
            self.formatter.write_still_stuck(self.still_stuck())
            self.out.write("\n")
        printed = self.formatter.printed if self.lines else None
        self.out.write(format_summary(summary, printed))
        if self.hist:
            self.out.write("\n" + format_hist(summary))
        self.out.flush()


class LifetimeOutput(Stage):
    """--lifetime: one line per finished connection, then the summary table."""

    def __init__(self, out: TextIO, options: Options) -> None:
        from tcptrace.sockets.lifetimes import Lifetimes

        self.out = out
        self.hist = options.hist
        self.formatter = LifetimeFormatter(
            out,
            options.make_clock(),
            numeric=options.numeric,
            places=options.make_places(),
            wide=options.wide,
        )
        # whole connections come as kernel records: the formatter reads them directly
        self.lifetimes = Lifetimes(self._write, options.filters.states, records=True)

    def _write(self, lives: list) -> None:
        self.formatter.write(lives)
        self.out.flush()

    def on_start(self) -> None:
        self.formatter.write_header()
        self.out.flush()

    def on_events(self, events: list[Event]) -> None:
        self.lifetimes.on_events(events)

    def on_finish(self, summary: Summary) -> None:
        self.lifetimes.remark_waiting(summary)
        self.out.write("\n" + format_summary(summary, self.formatter.printed, lifetimes=True))
        if self.hist:
            self.out.write("\n" + format_hist(summary))
        self.out.flush()


class KernelStats:
    """The kernel's statistics on demand, for stages and the metrics thread.

    One reader at a time; once closed (the probe is about to go) it answers with
    the last reading instead of touching the detached program.
    """

    def __init__(self, probe: EventSource) -> None:
        self.probe = probe
        self.lock = threading.Lock()
        self.closed = False
        self.last = Summary()
        # what user space knows better than the kernel (TIME_WAIT), applied to each
        # reading as the stages' on_finish apply it to the exit summary
        self.adjust: list[Callable[[Summary], None]] = []

    def __call__(self) -> Summary:
        with self.lock:
            if not self.closed:
                summary = self.probe.summary()
                for adjust in self.adjust:
                    adjust(summary)
                self.last = summary
            return self.last

    def close(self) -> None:
        with self.lock:
            self.closed = True


def build_stages(
    options: Options,
    out: TextIO,
    err: TextIO | None = None,
    summaries: KernelStats | None = None,
    tables: SocketTables | None = None,
    netns_fallback: bool = False,
    seed_listeners: Callable[[list], int] | None = None,
    scanner: Scanner | None = None,
    lives: dict[tuple[int, int], Life] | None = None,
    behind: Callable[[], bool] | None = None,
    accept_records: bool = False,
    mark_shared: Callable[[int, int, bool], None] | None = None,
    writer: CaptureWriter | RotatingWriter | None = None,
    capture_stuck: CaptureStuck | None = None,
) -> list[Stage]:
    """The stages for these options, in order: enrichment and TIME_WAIT following (with a
    sock_diag table and an event stream), metrics, then one output on `out`. With
    --lifetime, lives are the kernel's life records of each batch (loader.Probe.lives).
    accept_records: the kernel sends its accept records (ProbeConfig.accept_records).
    writer: --write's capture, the output instead of lines. capture_stuck: --stuck
    on a capture (-r), whose list at exit the outputs print (its reports come from
    the replay's source)."""
    err = err or sys.stderr
    stages: list[Stage] = []
    watch = None
    timewait = None
    owners = None
    if scanner is not None:
        from tcptrace.sockets.stuck import StuckWatch

        # first: its reports go through the owners' look-ups like transitions
        watch = StuckWatch(
            scanner,
            options.stuck,
            tables,
            filters=options.filters,
            oldest_wanted=bool(options.interval) or options.metrics is not None,
        )
        stages.append(watch)
    budget = Budget()  # shared: look-ups of both stages together stay within it
    if tables is not None and (options.emit_events or options.stuck):
        from tcptrace.sockets.enrich import Owners

        owners = Owners(
            options.filters,
            tables,
            budget=budget,
            netns_fallback=netns_fallback,
            seed_listeners=seed_listeners,
        )
        stages.append(owners)
        if watch is not None:
            watch.use_owners(owners)
    if tables is not None and (options.emit_events or options.follows_closes):
        from tcptrace.sockets.timewait import TimeWait

        # --lifetime --state: whole connections are chosen by the states they
        # visited (Lifetimes), their TIME_WAIT transitions are all needed
        chosen = replace(options.filters, states=frozenset()) if options.lifetime else None
        timewait = TimeWait(chosen or options.filters, tables, budget, lives=lives, behind=behind)
        stages.append(timewait)
        if summaries is not None:
            # metrics and the live table count FIN_WAIT2 -> TIME_WAIT -> CLOSE as the
            # exit summary does
            summaries.adjust.append(lambda summary: timewait.corrections().apply_to(summary))
    if accept_records:
        from tcptrace.sockets.acceptors import Acceptors

        # first: the accept records go no further, the lines they name wait before
        # anything else sees them
        acceptors = Acceptors(
            owner_filtered=bool(options.filters.owner_checks), mark_shared=mark_shared
        )
        stages.insert(0, acceptors)
        if owners is not None:
            # the listeners several processes held at start, before tracing is said to run
            owners.on_snapshot = lambda snap: acceptors.share(snap.shared_listeners)
        if summaries is not None:
            summaries.adjust.append(lambda summary: acceptors.corrections().apply_to(summary))
    stuck_source = watch if watch is not None else capture_stuck
    still_stuck = (
        (lambda: stuck_source.still) if stuck_source is not None and options.stuck else None
    )
    if options.metrics is not None and summaries is not None:
        from tcptrace.outputs.metrics import MetricsServer

        server = MetricsServer(
            options.metrics,
            summaries,
            options.filters.describe(),
            oldest=_scrape_oldest(watch) if watch is not None else None,
            stuck_states=options.stuck,
        )
        server.start()  # bound before "tracing ..." is printed: scrapers can rely on it
        stages.append(server)
    if options.interval and summaries is not None:
        from tcptrace.outputs.live import IntervalView, want_color

        color = want_color(out, options.no_color)
        redraw = out.isatty()  # like top on a terminal; one table after another in a pipe
        # drawn on this thread: the sockets older than tracing are checked before each frame
        oldest = (lambda: watch.oldest(verify=True)) if watch is not None else None
        stages.append(
            IntervalView(
                out,
                summaries,
                options.interval,
                color=color,
                redraw=redraw,
                oldest=oldest,
                stuck=bool(options.stuck),
            )
        )
        # the exit summary as usual, after the last table
        stages.append(TextOutput(out, replace(options, quiet=True, stuck={}), still_stuck))
    elif writer is not None:
        from tcptrace.outputs.capture import CaptureOutput

        stages.append(
            CaptureOutput(
                writer, options.write or "-", err, hist=options.hist, clock=options.make_clock()
            )
        )
    elif options.format != FORMAT_TEXT:
        from tcptrace.outputs.export import RecordOutput

        clock = options.make_clock()
        stages.append(
            RecordOutput(
                options.format,
                out,
                err,
                clock,
                # --stuck alone: its reports only, no transition records
                quiet=options.quiet or not options.transitions,
                lifetimes=options.lifetime,
                states=options.filters.states,
                still_stuck=still_stuck,
                hist=options.hist,
                places=options.make_places(),
            )
        )
    elif options.lifetime:
        stages.append(LifetimeOutput(out, options))
    else:
        stages.append(TextOutput(out, options, still_stuck))
    lifetimes = _lifetimes(stages)
    if lifetimes is not None and lives is not None:
        lifetimes.use_kernel(lives)
    if lifetimes is not None and timewait is not None:
        timewait.on_dropped = lifetimes.forget
    if lifetimes is not None and owners is not None:
        lifetimes.seen_since = owners.seen_since
    from tcptrace.pipes import PipeWatch, is_pipe

    # (--write FILE writes nothing on `out`: its reader may go, the capture goes on)
    if is_pipe(out) and (writer is None or options.write == "-"):
        stages.append(PipeWatch(out))  # | head: leave when the reader does, traffic or not
    return stages


def print_snapshot(options: Options, out: TextIO | None = None) -> int:
    """--snapshot: the matching TCP sockets and their owners, once (no BPF needed)."""
    from tcptrace.sockets import snapshot
    from tcptrace.sockets.procs import ProcessIndex
    from tcptrace.sockets.sockdiag import ALL_STATES, LISTEN_STATES

    out = out or sys.stdout
    states = LISTEN_STATES if options.listening else ALL_STATES
    if options.filters.states:
        states = states & options.filters.states
    with SocketTables() as tables:
        snap = snapshot.take(tables, ProcessIndex(), options.filters, states)
    several = len({row.netns for row in snap.rows}) > 1
    places = Places() if options.wide or several else None
    out.write(
        format_snapshot(
            snap.rows, numeric=options.numeric, extended=options.extended, places=places
        )
    )
    out.flush()
    return 0


def check(out: TextIO | None = None) -> int:
    """--check: what this kernel lets tcptrace do, one line per feature; 0 when tracing
    works (whatever is degraded), 1 when not."""
    from tcptrace.kernel import features
    from tcptrace.outputs.findings import format_findings
    from tcptrace.sockets.cgroups import cgroup2_mount, process_cgroup

    out = out or sys.stdout
    findings = features.check(cgroup2_mount(), process_cgroup(os.getpid()))
    out.write(format_findings(findings))
    out.flush()
    return features.exit_code(findings)


def _stop_on_early_sigterm() -> list[int]:
    """SIGTERM while the program loads is a stop request, honoured once tracing starts.

    The command installs the handler first thing (startup.install_early_signals); a
    caller of run() gets it here.
    """
    signal.signal(signal.SIGTERM, startup.record_sigterm)
    return startup.early_sigterms


def run(options: Options, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Trace until a stop condition; return the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    early_sigterm = _stop_on_early_sigterm()
    if options.snapshot:
        return print_snapshot(options, out)
    if options.read:
        from tcptrace.replay import replay

        return replay(options, out, err)
    preflight.run_all()
    writer = _open_writer(options) if options.write is not None else None
    from tcptrace.kernel.loader import Probe, ProbeConfig

    config = ProbeConfig(
        filters=options.filters,
        emit_events=options.emit_events or options.follows_closes,
        closes_only=options.follows_closes,
        max_sockets=options.max_sockets,
        # the scan's records: stuck reports, and which snapshot sockets the map holds
        keep_ends=options.scan,
        scan=options.scan,
        stuck_ns=options.stuck,
        kernel_lifetimes=options.lifetime,
    )
    if options.buffer_pages is not None:
        config = replace(config, buffer_pages=options.buffer_pages)
    else:
        config = replace(config, shrink_buffer=True)
    try:  # until tracing begins: a capture opened for it is left unused (no file)
        probe = Probe(config)
        netns_problem = probe.check_netns()
        if netns_problem is not None:
            if options.filters.netns:
                probe.close()
                raise TcptraceError(
                    "--netns needs the kernel to read each socket's network namespace, "
                    f"and it cannot here: {netns_problem}"
                )
            err.write(
                "tcptrace: the kernel cannot read sockets' network namespaces "
                f"({netns_problem}): each socket's namespace is its owner's /proc/PID/ns/net\n"
            )
        nested_problem = probe.check_nested()
        accept_problem = getattr(probe, "accept_problem", None)
        if accept_problem is not None:
            err.write(
                "tcptrace: an accepted connection keeps its listener's owner, not the "
                f"process that accepted it ({accept_problem})\n"
            )
        if nested_problem is not None:
            err.write(
                "tcptrace: transitions the kernel skips while a BPF program runs on their CPU "
                f"are only counted, not traced ({nested_problem})\n"
            )
        if options.emit_events and options.nice is not None:
            _raise_priority(options.nice)
        scanner = _open_scanner(probe, options, err) if options.scan else None
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    summaries = KernelStats(probe)
    stages: list[Stage] = []
    streams = options.emit_events or options.follows_closes
    tables = SocketTables() if streams or scanner is not None else None
    try:
        stages = build_stages(
            options,
            out,
            err,
            summaries,
            tables,
            netns_fallback=netns_problem is not None,
            seed_listeners=probe.seed_listeners,
            scanner=scanner,
            lives=probe.lives,
            behind=getattr(probe, "behind", None),
            accept_records=accept_problem is None
            and getattr(getattr(probe, "config", None), "accept_records", False),
            mark_shared=getattr(probe, "mark_shared", None),
            writer=writer,
        )
        # first: its on_finish completes the final accounting the outputs print
        unit = "connections" if options.lifetime else "events"
        why = loss_advice(options.max_cpu if options.emit_events else None, options.lifetime)
        stages.insert(0, LossReport(probe, err, unit, why))
        tracer = Tracer(
            probe,
            stages,
            # --lifetime counts connections, not transitions (below)
            StopConditions(None if options.lifetime else options.count, options.duration),
            cpu_budget=options.max_cpu if options.emit_events else None,
            poll_ms=poll_ms(options),
        )
        if options.lifetime and options.count is not None:
            stop_after_lifetimes(stages, options.count, tracer.request_stop)
        tracer.install_signals()
        if early_sigterm:
            early_sigterm.clear()
            tracer.request_stop()
        tracer.start()
        fallback = getattr(probe, "scan_fallback", None)
        if scanner is not None and fallback is not None:
            # said once the outputs stand: a bad --metrics port is still the only line
            err.write(f"tcptrace: {fallback}: the socket map is walked in user space instead\n")
        cgroup_fallback = getattr(probe, "cgroup_fallback", None)
        if cgroup_fallback is not None:
            err.write(f"tcptrace: {cgroup_fallback}\n")
        err.write(f"tracing {options.filters.describe()} ... Ctrl-C to stop\n")
        err.flush()
        tracer.run()
    except BrokenPipeError:
        if writer is not None:
            # --write -: a capture cut short is an error (one line, exit 1)
            from tcptrace.kernel.capfile import CaptureError

            startup.silence(out)
            raise CaptureError(
                f"{options.write}: cannot write: the reader went away; "
                f"the {writer.records_written} whole records written before stay readable"
            ) from None
        # the reader went away (| head): leave quietly, without a traceback, now
        # or at exit when Python flushes what is still buffered
        startup.reader_gone(out, err)
        return 0
    finally:
        summaries.close()
        for stage in stages:
            close = getattr(stage, "close", None)
            if close is not None:
                close()  # servers and threads go before the program they read
        probe.close()
        if tables is not None:
            tables.close()
        if writer is not None:
            # (again: the stage closed it, or said why it could not; a failed build did not)
            with contextlib.suppress(OSError):
                writer.close()
            if options.write == "-":
                try:
                    sys.stdout.flush()
                except OSError:
                    startup.silence(sys.stdout)  # the error is said: not again at exit
    return 0


def _open_writer(options: Options) -> CaptureWriter | RotatingWriter:
    """--write's capture, opened before the program loads: a bad path is said at once."""
    from tcptrace import __version__
    from tcptrace.kernel.capfile import CaptureError, CaptureWriter, RotatingWriter, host_meta

    meta = host_meta(["tcptrace", *sys.argv[1:]], __version__)
    path = options.write
    assert path is not None
    try:
        # deferred: a run that fails before tracing writes nothing (and leaves no file)
        if path == "-":
            return CaptureWriter(sys.stdout.buffer, meta, deferred=True)
        return RotatingWriter(path, options.file_size, options.file_count, meta, deferred=True)
    except OSError as exc:
        raise CaptureError(f"{path}: cannot write: {exc.strerror or exc}") from None


def poll_ms(options: Options) -> int:
    """The loop's longest wait: lines at each transition and live frames want the finer
    grain; a watcher that prints no line per transition wakes half as often."""
    return POLL_MS if options.emit_events or options.interval else QUIET_POLL_MS


def _open_scanner(probe: object, options: Options, err: TextIO) -> Scanner | None:
    """The kernel's map scan; --stuck cannot do without it, OLDEST and the gauges can."""
    from tcptrace.sockets.stuck import Scanner

    problem = probe.open_scan()  # type: ignore[attr-defined]
    if problem is None:
        return Scanner(probe)  # type: ignore[arg-type]
    if options.stuck:
        probe.close()  # type: ignore[attr-defined]
        raise TcptraceError(f"--stuck needs the kernel to scan its socket map: {problem}")
    err.write(f"tcptrace: no OLDEST ages: the kernel cannot scan its socket map ({problem})\n")
    return None


def _scrape_oldest(watch: StuckWatch) -> Callable[[], Oldest]:
    """What a scrape reads of the map's walk: one at most SCRAPE_SCAN_S old."""
    from tcptrace.sockets.stuck import SCRAPE_SCAN_S

    return lambda: watch.oldest(max_age_s=SCRAPE_SCAN_S)


def _lifetimes(stages: list[Stage]) -> Lifetimes | None:
    """The --lifetime output's connection tracker, if there is one."""
    from tcptrace.sockets.lifetimes import Lifetimes

    for stage in stages:
        lifetimes = getattr(stage, "lifetimes", None)
        if isinstance(lifetimes, Lifetimes):
            return lifetimes
    return None


def stop_after_lifetimes(stages: list[Stage], count: int, stop: Callable[[], None]) -> None:
    """--lifetime --count N: stop after N finished connections."""
    lifetimes = _lifetimes(stages)
    if lifetimes is not None:
        lifetimes.stop_after(count, stop)


def _raise_priority(nice: int) -> None:
    """Run at this nice value; never lower the priority we were given."""
    try:
        if nice < os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError:
        pass  # not permitted (no CAP_SYS_NICE): keep the priority we have
