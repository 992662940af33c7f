"""Machine-readable output: JSON lines and CSV, one record per transition.

Every record is a flat dict of plain values. A writer turns records into text:
JSON lines take records of any kind (each object names its "type"), CSV takes
the one kind its header describes. A new record type is one small method that
builds its dict and calls write_record (see RecordOutput.transition/summary).

Schema (README "Machine-readable output"):
  transition: time, ts_ns, pid, comm, family, local_addr, local_port,
              remote_addr, remote_port, old, new, duration_ns, note
  summary:    transitions_traced, written, faster, lost, held, notes[...],
              time_wait_not_followed, time_wait_dropped_with_netns,
              still_in_time_wait, states{...}, transitions[...]
              (with --hist, each state also has hist[{low_ns, high_ns, count}])
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any, TextIO

from tcptrace.kernel.events import (
    AF_INET,
    C_SEEN,
    F_DELTA_KNOWN,
    F_DELTA_LOWER,
    F_END_UNSURE,
    F_OWNER_KNOWN,
    F_OWNER_SHARED,
    F_POLLED,
    F_STUCK,
    Event,
    format_addr,
)
from tcptrace.kernel.stats import PERCENTILES, Summary
from tcptrace.outputs.hist import format_hist, hist_record
from tcptrace.outputs.output import NS_PER_S, NS_PER_US, Clock, format_summary, write_all
from tcptrace.sockets.flows import lost_events
from tcptrace.sockets.lifetimes import Lifetime, Lifetimes
from tcptrace.sockets.places import Place, Places
from tcptrace.stages import Stage
from tcptrace.states import LIFECYCLE_ORDER, state_name

KIND_TRANSITION = "transition"
KIND_SUMMARY = "summary"
KIND_LIFETIME = "lifetime"
# --stuck: a socket that crossed its threshold, and at exit those still past it
KIND_STUCK = "stuck"
KIND_STILL_STUCK = "still_stuck"

FORMAT_JSON = "json"
FORMAT_CSV = "csv"
FORMATS = (FORMAT_JSON, FORMAT_CSV)

# Column order of a transition record: the CSV header, and the JSON key order.
TRANSITION_FIELDS = (
    "time",
    "ts_ns",
    "pid",
    "comm",
    "family",
    "local_addr",
    "local_port",
    "remote_addr",
    "remote_port",
    "old",
    "new",
    "duration_ns",
    "note",
    "netns",
    "netns_name",
    "cgroup",
    "container",
)

Record = dict[str, Any]


def family_name(family: int) -> str:
    return "ipv4" if family == AF_INET else "ipv6"


@lru_cache(maxsize=4096)
def _json_text(text: str | None) -> str:
    """A command name as a JSON value; cached, as a handful of names repeat."""
    return json.dumps(text, ensure_ascii=False)


_STATE_NAMES = {n: state_name(n) for n in range(256)}
# Caches of formatted fragments are dropped whole when they grow past this.
_CACHE_MAX = 16384


class IsoClock:
    """Kernel monotonic ns -> ISO 8601 UTC with microseconds, cached per second."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._second = -1
        self._prefix = ""

    def format(self, mono_ns: int) -> str:
        secs, frac = divmod(self.clock.wall_ns(mono_ns), NS_PER_S)
        return f"{self.prefix(secs)}.{frac // NS_PER_US:06d}Z"

    def prefix(self, secs: int) -> str:
        """The date and time of a wall-clock second, up to the seconds."""
        if secs != self._second:
            # strftime costs a microsecond; at high rates most events share a second
            self._second = secs
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        return self._prefix


_NOTED = F_POLLED | F_END_UNSURE | F_OWNER_SHARED
# The summary's remarks that programs may count on (0 when there was none).
REMARKS = ("time_wait_not_followed", "time_wait_dropped_with_netns", "still_in_time_wait")


def transition_note(flags: int) -> str | None:
    """What a transition record must say of itself: learnt from sock_diag, not traced;
    or an end that may hide a TIME_WAIT (its timewait socket was not looked for)."""
    if flags & F_POLLED:
        return NOTE_POLLED
    if flags & F_END_UNSURE:
        return NOTE_END_UNSURE
    if flags & F_OWNER_SHARED:
        return NOTE_OWNER_SHARED
    return None


NOTE_POLLED = "learnt_from_sock_diag"
NOTE_END_UNSURE = "time_wait_not_followed"
# pid/comm are the listener's creator, one of the processes holding it: none accepted
# the connection within sockets.acceptors.HOLD_NS
NOTE_OWNER_SHARED = "listener_shared"


def summary_record(summary: Summary, written: int | None, hist: bool = False) -> Record:
    """The exit summary as one record: accounting, then per state and per transition.
    hist: each state's log2 histogram too (--hist), the rows the text shows."""
    states: dict[str, Record] = {}
    for state in LIFECYCLE_ORDER:
        stats = summary.states.get(int(state))
        if stats is None or (stats.count == 0 and stats.unknown == 0):
            continue
        entry: Record = {
            "left": stats.count + stats.unknown,
            "timed": stats.count,
            "untimed": stats.unknown,
            "mean_ns": round(stats.mean_ns) if stats.count else None,
        }
        for pct in PERCENTILES:
            value = stats.percentile(pct) if stats.count else None
            entry[f"p{pct:g}_ns"] = None if value is None else round(value)
        entry["max_ns"] = stats.max_ns if stats.count else None
        if hist:
            entry["hist"] = hist_record(stats)
        states[state.name] = entry
    transitions = [
        {"old": state_name(old), "new": state_name(new), "count": n}
        for (old, new), n in sorted(summary.transitions.items())
    ]
    return {
        "transitions_traced": summary.counters[C_SEEN],
        "written": written,
        # not written because faster than --slower-than (null without it)
        "faster": summary.faster if summary.slower_than else None,
        "lost": lost_events(summary),
        "held": summary.held,
        # the text summary's remarks: each line, and the numbers behind them
        "notes": list(summary.notes),
        **{name: summary.remarks.get(name, 0) for name in REMARKS},
        "states": states,
        "transitions": transitions,
    }


class JsonLinesWriter:
    """One JSON object per line; any record kind, named by its "type" key."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def write_record(self, kind: str, record: Record) -> None:
        self.write_records(kind, (record,))

    def write_records(self, kind: str, records: Any) -> None:
        encode = self._encode
        lines = [encode({"type": kind, **record}) for record in records]
        if lines:
            lines.append("")
            write_all(self.out, "\n".join(lines))

    def flush(self) -> None:
        self.out.flush()


class CsvWriter:
    """A header, then one row per record, for the one kind the columns describe.

    Records of other kinds have no place in that table: write_record returns
    False for them and the caller puts them elsewhere (the summary goes to stderr).
    """

    def __init__(self, out: TextIO, kind: str, columns: tuple[str, ...]) -> None:
        self.out = out
        self.kind = kind
        self.columns = columns
        self._writer = csv.writer(out, lineterminator="\n")
        self._header_done = False

    def accepts(self, kind: str) -> bool:
        return kind == self.kind

    def write_header(self) -> None:
        if not self._header_done:
            self._writer.writerow(self.columns)
            self._header_done = True

    def write_record(self, kind: str, record: Record) -> bool:
        return self.write_records(kind, (record,))

    def write_records(self, kind: str, records: Any) -> bool:
        if kind != self.kind:
            return False
        self.write_header()
        columns = self.columns
        # None (unknown) is an empty cell, as csv does by default
        self._writer.writerows([record.get(c) for c in columns] for record in records)
        return True

    def write_rows(self, rows: list[tuple[Any, ...]]) -> None:
        """Rows already in column order."""
        self.write_header()
        self._writer.writerows(rows)

    def flush(self) -> None:
        self.out.flush()


class RecordOutput(Stage):
    """--json / --csv: one record per transition, flushed per batch, then the summary.

    JSON ends with a summary object; CSV keeps stdout a pure table and prints the
    human summary table on `err` instead.
    """

    def __init__(
        self,
        fmt: str,
        out: TextIO,
        err: TextIO,
        clock: Clock,
        quiet: bool = False,
        lifetimes: bool = False,
        still_stuck: Callable[[], list[Event]] | None = None,
        states: Iterable[int] = (),
        hist: bool = False,
        places: Places | None = None,
    ) -> None:
        self.fmt = fmt
        self.hist = hist  # --hist: in the JSON summary, or after the text one on `err`
        # --stuck: the sockets still stuck at exit (sockets/stuck.StuckWatch.still)
        self.still_stuck = still_stuck
        self.err = err
        self.quiet = quiet
        self.iso = IsoClock(clock)
        self.written = 0
        # --lifetime: one record per finished connection instead of per transition
        # (--state: those that visited one of these states)
        self.lifetimes = Lifetimes(self._write_lifetimes, states) if lifetimes else None
        if fmt == FORMAT_JSON:
            self.writer: JsonLinesWriter | CsvWriter = JsonLinesWriter(out)
        elif fmt == FORMAT_CSV:
            self.writer = CsvWriter(out, KIND_TRANSITION, TRANSITION_FIELDS)
        else:
            raise ValueError(f"unknown record format {fmt!r}")
        # caches of the JSON fragments that repeat (transition_lines)
        self._owner_json: dict[tuple[int, bytes, int, int], str] = {}
        self._end_json: dict[tuple[int, bytes, int], str] = {}
        self._change_json: dict[tuple[int, int], str] = {}
        self.places = places if places is not None else Places()
        self._place_json: dict[tuple[int, int, int], str] = {}

    # -- record builders: one small method per record type --------------------

    def owner(self, ev: Event) -> tuple[int | None, str | None]:
        # enrich.Owners has already looked up what the kernel could not attribute
        if ev.owner_known:
            return ev.pid, ev.command
        return None, None

    def transition(self, ev: Event) -> Record:
        pid, comm = self.owner(ev)
        return {
            "time": self.iso.format(ev.ts_ns),
            "ts_ns": ev.ts_ns,
            "pid": pid,
            "comm": comm,
            "family": family_name(ev.family),
            "local_addr": format_addr(ev.family, ev.saddr),
            "local_port": ev.sport,
            "remote_addr": format_addr(ev.family, ev.daddr),
            "remote_port": ev.dport,
            "old": state_name(ev.oldstate),
            "new": state_name(ev.newstate),
            "duration_ns": ev.delta_ns if ev.delta_known else None,
            "note": transition_note(ev.flags),
            **self.place(ev),
        }

    def stuck(self, ev: Event) -> Record:
        """A stuck report: a transition record's fields, with the state and its age
        (a lower bound for a socket older than tracing) instead of old, new, duration."""
        record = self.transition(ev)
        del record["old"], record["new"], record["duration_ns"]
        record["state"] = state_name(ev.newstate)
        record["age_ns"] = ev.delta_ns
        record["age_lower_bound"] = bool(ev.flags & F_DELTA_LOWER)
        del record["note"]
        return record

    def place(self, ev: Event) -> Record:
        return self._place_fields(self.places.of(ev.netns, ev.cgroup_id, ev.pid, ev.owner_known))

    @staticmethod
    def _place_fields(place: Place) -> Record:
        return {
            "netns": place.netns,
            "netns_name": place.netns_name,
            "cgroup": place.cgroup,
            "container": place.container,
        }

    def lifetime(self, life: Lifetime) -> Record:
        """A connection's record: its fields in order (dataclasses.asdict's, without the
        cost of its deep copy), the owner's cgroup as a path, then the times as text."""
        place = self.places.of(life.netns, life.cgroup_id, life.pid, bool(life.pid))
        return {
            "start_ns": life.start_ns,
            "end_ns": life.end_ns,
            "pid": life.pid,
            "comm": life.comm,
            "family": family_name(life.family),
            "local_addr": life.local_addr,
            "local_port": life.local_port,
            "remote_addr": life.remote_addr,
            "remote_port": life.remote_port,
            "duration_ns": life.duration_ns,
            "complete": life.complete,
            "states": [
                {"state": s.state, "duration_ns": s.duration_ns, "lower_bound": s.lower_bound}
                for s in life.states
            ],
            **self._place_fields(place),
            "start": self.iso.format(life.start_ns),
            "end": self.iso.format(life.end_ns),
        }

    def _write_lifetimes(self, lives: list[Lifetime]) -> None:
        self.writer.write_records(KIND_LIFETIME, [self.lifetime(life) for life in lives])
        self.writer.flush()
        self.written += len(lives)

    def write_record(self, kind: str, record: Record) -> bool:
        """Write one record of any kind; False when the format has no place for it."""
        written = self.writer.write_record(kind, record)
        self.writer.flush()
        return written is not False

    # -- Stage -----------------------------------------------------------------

    def on_start(self) -> None:
        if isinstance(self.writer, CsvWriter) and not self.quiet:
            # the header at once, so a reader knows the columns before any traffic
            self.writer.write_header()
            self.writer.flush()

    def transition_json(self, ev: Event) -> str:
        """transition(ev) as a JSON line (tests/outputs/test_export.py checks they agree)."""
        return self.transition_lines([ev])[0]

    def transition_lines(self, events: list[Event]) -> list[str]:
        """transition(ev) of each event as a JSON line, formatted directly: the hot path.

        Equal to encoding transition(ev), at a fraction of the cost: the parts that
        repeat (owner, each end, the state pair, the second of the time) are
        formatted once and cached; only the command name needs JSON escaping.
        """
        iso = self.iso
        owners, ends, changes = self._owner_json, self._end_json, self._change_json
        places = self._place_json
        out: list[str] = []
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
            key = (netns, cgroup_id, pid if flags & F_OWNER_KNOWN and not cgroup_id else 0)
            place = places.get(key) or self._place_part(ev, key)
            owner = owners.get((pid, comm, flags & F_OWNER_KNOWN, family)) or self._owner_part(ev)
            local = ends.get((family, saddr, sport)) or self._end_part(family, saddr, sport)
            remote = ends.get((family, daddr, dport)) or self._end_part(family, daddr, dport)
            change = changes.get((old, new)) or self._change_part(old, new)
            secs, frac = divmod(ts + iso.clock.offset_ns, NS_PER_S)
            prefix = iso.prefix(secs)
            micro = frac // NS_PER_US
            duration = delta if flags & F_DELTA_KNOWN else "null"
            note = f'"{transition_note(flags)}"' if flags & _NOTED else "null"
            append(
                f'{{"type":"transition","time":"{prefix}.{micro:06d}Z","ts_ns":{ts},{owner},'
                f'"local_addr":{local},"local_port":{sport},'
                f'"remote_addr":{remote},"remote_port":{dport},{change},"duration_ns":{duration},'
                f'"note":{note},{place}}}'
            )
        return out

    def _owner_part(self, ev: Event) -> str:
        """ "pid":..,"comm":..,"family":.. of an event, cached (family rides along)."""
        pid, comm = self.owner(ev)
        if len(self._owner_json) > _CACHE_MAX:
            self._owner_json.clear()
        key = (ev.pid, ev.comm, ev.flags & F_OWNER_KNOWN, ev.family)
        text = self._owner_json[key] = (
            f'"pid":{"null" if pid is None else pid},"comm":{_json_text(comm)},'
            f'"family":"{family_name(ev.family)}"'
        )
        return text

    def _place_part(self, ev: Event, key: tuple[int, int, int]) -> str:
        """ "netns":..,"netns_name":..,"cgroup":..,"container":.. of an event, cached."""
        if len(self._place_json) > _CACHE_MAX:
            self._place_json.clear()
        place = self.places.of(ev.netns, ev.cgroup_id, ev.pid, ev.owner_known)
        text = ",".join(
            f'"{name}":{_json_value(value)}' for name, value in self._place_fields(place).items()
        )
        if place.complete:
            self._place_json[key] = text
        return text

    def _end_part(self, family: int, raw: bytes, port: int) -> str:
        """An address as a JSON string, cached per (family, address, port)."""
        if len(self._end_json) > _CACHE_MAX:
            self._end_json.clear()
        text = self._end_json[(family, raw, port)] = f'"{format_addr(family, raw)}"'
        return text

    def _change_part(self, old: int, new: int) -> str:
        text = self._change_json[(old, new)] = (
            f'"old":"{_STATE_NAMES[old]}","new":"{_STATE_NAMES[new]}"'
        )
        return text

    def transition_row(self, ev: Event) -> tuple[Any, ...]:
        """transition(ev) as a CSV row in TRANSITION_FIELDS order (the hot path)."""
        pid, comm = self.owner(ev)
        family = ev.family
        return (
            self.iso.format(ev.ts_ns),
            ev.ts_ns,
            pid,
            comm,
            family_name(family),
            format_addr(family, ev.saddr),
            ev.sport,
            format_addr(family, ev.daddr),
            ev.dport,
            _STATE_NAMES[ev.oldstate],
            _STATE_NAMES[ev.newstate],
            ev.delta_ns if ev.delta_known else None,
            transition_note(ev.flags),
            *self.place(ev).values(),
        )

    def on_events(self, events: list[Event]) -> None:
        if events and events[0].flags & F_STUCK:
            # the stuck watch's own batch: reports, whatever --quiet says of transitions
            self.writer.write_records(KIND_STUCK, [self.stuck(ev) for ev in events])
            self.writer.flush()
            return
        if self.quiet:
            return
        if self.lifetimes is not None:
            # even an empty batch: it may carry the kernel's record of a connection
            # whose closing event TIME_WAIT following holds back (Lifetimes._held)
            self.lifetimes.on_events(events)
            return
        if not events:
            return
        writer = self.writer
        if isinstance(writer, JsonLinesWriter):
            lines = self.transition_lines(events)
            lines.append("")
            write_all(writer.out, "\n".join(lines))
        else:
            writer.write_rows([self.transition_row(ev) for ev in events])
        self.written += len(events)
        writer.flush()

    def on_finish(self, summary: Summary) -> None:
        if self.lifetimes is not None:
            self.lifetimes.remark_waiting(summary)
        if self.still_stuck is not None:
            still = [self.stuck(ev) for ev in self.still_stuck()]
            self.writer.write_records(KIND_STILL_STUCK, still)
        written = None if self.quiet else self.written
        if not self.write_record(KIND_SUMMARY, summary_record(summary, written, self.hist)):
            self.err.write(format_summary(summary, written))
            if self.hist:
                self.err.write("\n" + format_hist(summary))
            self.err.flush()


def _json_value(value: object) -> str:
    """A JSON value (numbers, strings, null) as json.dumps writes it."""
    return json.dumps(value, ensure_ascii=False)
