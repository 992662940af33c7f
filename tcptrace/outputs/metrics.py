"""--metrics [ADDR:]PORT: Prometheus metrics over HTTP (prometheus_client).

A custom collector reads the kernel's exact statistics at scrape time, so each
scrape is as fresh and as exact as the exit summary, costs the hot path nothing,
and works with --quiet (no per-event stream at all):

  tcptrace_transitions_total{old,new}          counter
  tcptrace_state_duration_seconds{state}       histogram of time spent in a state
                                               by sockets that left it (timed exits)
  tcptrace_sockets{state}                      gauge: sockets in the state now
  tcptrace_events_traced_total                 transitions that passed the filters
  tcptrace_events_lost_total                   events not delivered to user space
  tcptrace_events_faster_total                 with --slower-than: transitions not
                                               shown, faster than their threshold
  tcptrace_info{version,filter}                1

Histogram buckets sit on powers of two nanoseconds, which are bucket edges of
the kernel's log-linear histogram, so every bucket count is exact.

Sockets that left a state after an unknown time (they existed before tracing
started) are not in the histogram: they are the transitions out of the state
minus the histogram's count. They get no counter of their own because the
kernel's maps are read one after another while they change, and a difference
of two maps could step backwards, which a Prometheus counter must never do.

With an event stream, the summary is corrected as the exit summary is (TIME_WAIT,
tcptrace/sockets/timewait.py): the kernel counts a FIN_WAIT2 -> CLOSE at once, user space
relabels it FIN_WAIT2 -> TIME_WAIT when it reads the event, up to ~50 ms later. A
scrape in between would see the counter step back afterwards, so every counter
and histogram series is exported as the largest value it has had: a scrape in that
window leaves the one transition counted in both until the series catches up.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Callable

from tcptrace import __version__
from tcptrace.errors import TcptraceError
from tcptrace.kernel.events import C_SEEN
from tcptrace.kernel.stats import StateStats, Summary, hist_slot
from tcptrace.outputs.output import NS_PER_S
from tcptrace.sockets.flows import lost_events, sockets_in_states
from tcptrace.sockets.stuck import Oldest
from tcptrace.stages import Stage
from tcptrace.states import LIFECYCLE_ORDER, TcpState, state_name

TIME_WAIT = int(TcpState.TIME_WAIT)

DEFAULT_ADDRESS = "127.0.0.1"

# Bucket edges 2**k ns: from about 1 µs to about 73 minutes, doubling.
BUCKET_EXPONENTS = range(10, 43)

SummaryProvider = Callable[[], Summary]


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen_address(text: str) -> ListenAddress:
    """[ADDR:]PORT: '9100', '0.0.0.0:9100', '[::1]:9100'. ADDR is an IP literal or localhost."""
    text = text.strip()
    host = DEFAULT_ADDRESS
    port_text = text
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{text!r}: write an IPv6 address as [ADDR]:PORT")
        host, port_text = text[1:close], text[close + 2 :]
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address as [ADDR]:PORT")
    if host.lower() == "localhost":
        host = DEFAULT_ADDRESS  # the one name everybody types; no resolver involved
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if not port_text.isdigit():
        raise ValueError(f"{port_text!r} is not a port number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range 1-65535")
    return ListenAddress(host, port)


def histogram_buckets(hist: list[int]) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from one state's kernel histogram."""
    buckets = []
    running = 0
    start = 0
    for k in BUCKET_EXPONENTS:
        # all slots below the one that starts at 2**k ns hold durations < 2**k ns
        end = hist_slot(1 << k)
        running += sum(hist[start:end])
        start = end
        buckets.append((repr((1 << k) / NS_PER_S), float(running)))
    buckets.append(("+Inf", float(running + sum(hist[start:]))))
    return buckets


class StateCollector:
    """prometheus_client custom collector over the latest kernel Summary."""

    def __init__(
        self,
        summaries: SummaryProvider,
        filter_text: str = "",
        oldest: Callable[[], Oldest] | None = None,
        stuck_states: Iterable[int] = (),
    ) -> None:
        self.summaries = summaries
        self.filter_text = filter_text
        # each state's oldest socket now (sockets/stuck.StuckWatch.oldest), if scanned
        self.oldest = oldest
        self.stuck_states = sorted(stuck_states)  # states with a --stuck threshold
        # series -> the largest value exported: counters never step back
        self._high: dict[tuple, float] = {}
        self._lock = threading.Lock()  # scrapes may come in parallel

    def _counter(self, key: tuple, value: float) -> float:
        high = self._high.get(key, 0.0)
        if value > high:
            self._high[key] = high = value
        return high

    def describe(self) -> list[Any]:
        # no samples at registration: the probe may not be readable yet
        return []

    def collect(self) -> Iterator[Any]:
        with self._lock:
            yield from self._collect()

    def _collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        summary = self.summaries()

        info = GaugeMetricFamily(
            "tcptrace_info", "tcptrace version and filter", labels=["version", "filter"]
        )
        info.add_metric([__version__, self.filter_text], 1)
        yield info

        transitions = CounterMetricFamily(
            "tcptrace_transitions",
            "TCP state transitions of matching sockets, by old and new state",
            labels=["old", "new"],
        )
        # a series once exported stays (a relabelled transition may take a count to 0)
        pairs = set(summary.transitions)
        pairs.update(key[1:] for key in self._high if key[0] == "transitions")
        for old, new in sorted(pairs):
            n = self._counter(("transitions", old, new), summary.transitions.get((old, new), 0))
            transitions.add_metric([state_name(old), state_name(new)], n)
        yield transitions

        durations = HistogramMetricFamily(
            "tcptrace_state_duration_seconds",
            "Time spent in a state by the sockets that left it (from the kernel's histograms)",
            labels=["state"],
        )
        for state in LIFECYCLE_ORDER:
            stats = summary.states.get(int(state)) or StateStats()
            if stats.count or ("sum", state) in self._high:
                buckets = [
                    (le, self._counter(("bucket", state, le), n))
                    for le, n in histogram_buckets(stats.hist)
                ]
                total = self._counter(("sum", state), stats.total_ns / NS_PER_S)
                durations.add_metric([state.name], buckets, total)
        yield durations

        current = sockets_in_states(summary)
        if self.oldest is not None:
            # the map's walk counted them at one instant (with the live sockets older
            # than tracing), as the live table's NOW: entries minus exits, read from
            # maps that change while they are read, ran 1,000s ahead under churn
            walked = self.oldest()
            if walked.taken_ns:
                # (timewait sockets are not in the map: TIME_WAIT is followed's count)
                current = {
                    st: n if st == TIME_WAIT else walked.count.get(st, 0)
                    for st, n in current.items()
                }
        sockets = GaugeMetricFamily(
            "tcptrace_sockets",
            "Sockets in each state now: the kernel's per-socket map walked at most a "
            "second ago, with the sockets older than tcptrace still there",
            labels=["state"],
        )
        for state, n in current.items():
            sockets.add_metric([TcpState(state).name], n)
        yield sockets

        if self.oldest is not None:
            yield from self._ages(GaugeMetricFamily)

        yield CounterMetricFamily(
            "tcptrace_events_traced",
            "TCP state transitions that passed the filters (counted in the kernel)",
            value=self._counter(("traced",), summary.counters[C_SEEN]),
        )
        yield CounterMetricFamily(
            "tcptrace_events_lost",
            "Transition events not delivered to user space (statistics stay exact)",
            value=self._counter(("lost",), lost_events(summary)),
        )
        if summary.slower_than:
            yield CounterMetricFamily(
                "tcptrace_events_faster",
                "Transitions not shown: faster than their --slower-than threshold "
                "(counted in the kernel, not lost)",
                value=self._counter(("faster",), summary.faster),
            )

    def _ages(self, gauge: Any) -> Iterator[Any]:
        assert self.oldest is not None
        oldest = self.oldest()
        ages = gauge(
            "tcptrace_state_oldest_seconds",
            "Age of the oldest socket in each state now (a lower bound for sockets older "
            "than tcptrace)",
            labels=["state"],
        )
        for state in LIFECYCLE_ORDER:
            age = oldest.ages.get(int(state))
            if age is not None:
                ages.add_metric([state.name], age[0] / NS_PER_S)
        yield ages
        if self.stuck_states:
            stuck = gauge(
                "tcptrace_sockets_stuck",
                "Sockets in each state longer than its --stuck threshold now",
                labels=["state"],
            )
            for state in self.stuck_states:
                stuck.add_metric([TcpState(state).name], oldest.stuck.get(state, 0))
            yield stuck


class MetricsServer(Stage):
    """Serves the collector over HTTP from start() until on_finish (or close).

    start() is called before tracing begins, so the endpoint answers as soon as
    the "tracing ..." line appears and a port in use fails before any tracing.
    """

    def __init__(
        self,
        address: ListenAddress,
        summaries: SummaryProvider,
        filter_text: str = "",
        oldest: Callable[[], Oldest] | None = None,
        stuck_states: Iterable[int] = (),
    ) -> None:
        self.address = address
        self.collector = StateCollector(summaries, filter_text, oldest, stuck_states)
        self._server: Any = None
        self._thread: Any = None

    def start(self) -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.process_collector import ProcessCollector

        registry = CollectorRegistry()
        registry.register(self.collector)
        # tcptrace's own CPU and memory: what watching costs
        ProcessCollector(registry=registry)
        try:
            self._server, self._thread = start_http_server(
                self.address.port, addr=self.address.host, registry=registry
            )
        except OSError as exc:
            raise TcptraceError(
                f"cannot serve metrics on {self.address}: {exc.strerror or exc}"
            ) from None

    def on_finish(self, summary: Summary) -> None:
        self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
