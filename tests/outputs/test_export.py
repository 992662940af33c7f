"""JSON lines and CSV: the documented schema, streaming per batch, the summary record."""

import csv
import io
import json
import socket

from tcptrace.kernel.events import C_FAST, C_SEEN, F_DELTA_KNOWN, F_END_UNSURE, F_POLLED
from tcptrace.kernel.stats import Summary
from tcptrace.outputs.export import (
    FORMAT_CSV,
    FORMAT_JSON,
    TRANSITION_FIELDS,
    CsvWriter,
    IsoClock,
    JsonLinesWriter,
    RecordOutput,
    summary_record,
)
from tcptrace.outputs.output import Clock
from tcptrace.states import TcpState
from tests.outputs.test_output import make_event

# wall clock = monotonic + 1_700_000_000 s: make_event's ts 5 s -> 2023-11-14T22:13:25Z
CLOCK = Clock(start_mono_ns=0, offset_ns=1_700_000_000 * 10**9)


def output(fmt, quiet=False):
    out, err = io.StringIO(), io.StringIO()
    return RecordOutput(fmt, out, err, CLOCK, quiet=quiet), out, err


def test_transition_record_follows_the_schema():
    stage, _, _ = output(FORMAT_JSON)
    record = stage.transition(make_event())
    assert tuple(record) == TRANSITION_FIELDS
    assert record == {
        "time": "2023-11-14T22:13:25.000000Z",
        "ts_ns": 5_000_000_000,
        "pid": 2588,
        "comm": "curl",
        "family": "ipv4",
        "local_addr": "127.0.0.1",
        "local_port": 42374,
        "remote_addr": "127.0.0.1",
        "remote_port": 30123,
        "old": "SYN_SENT",
        "new": "ESTABLISHED",
        "duration_ns": 437_200,
        "note": None,
        "netns": None,
        "netns_name": None,
        "cgroup": None,
        "container": None,
    }


def test_a_transition_says_when_it_was_learnt_or_may_hide_a_time_wait():
    stage, _, _ = output(FORMAT_JSON)
    polled = make_event(TcpState.FIN_WAIT2, TcpState.TIME_WAIT, flags=F_DELTA_KNOWN | F_POLLED)
    unsure = make_event(TcpState.FIN_WAIT2, TcpState.CLOSE, flags=F_DELTA_KNOWN | F_END_UNSURE)
    records = [stage.transition(ev) for ev in (polled, unsure, make_event())]
    assert [r["note"] for r in records] == [
        "learnt_from_sock_diag",
        "time_wait_not_followed",
        None,
    ]
    # the hot path writes the same
    lines = stage.transition_lines([polled, unsure, make_event()])
    assert [json.loads(line)["note"] for line in lines] == [r["note"] for r in records]


def test_the_summary_carries_every_remark_of_the_text_summary():
    summary = Summary()
    summary.remark("time_wait_not_followed", 3, "TIME_WAIT: 3 closing sockets not followed")
    record = summary_record(summary, written=0)
    assert record["notes"] == ["TIME_WAIT: 3 closing sockets not followed"]
    assert record["time_wait_not_followed"] == 3
    assert record["still_in_time_wait"] == record["time_wait_dropped_with_netns"] == 0


def test_unknown_duration_and_owner_are_null():
    stage, _, _ = output(FORMAT_JSON)
    record = stage.transition(make_event(TcpState.CLOSE, TcpState.SYN_SENT, flags=0))
    assert record["duration_ns"] is None
    assert record["pid"] is None and record["comm"] is None


def test_ipv6_and_mapped_addresses():
    stage, _, _ = output(FORMAT_JSON)
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.1")
    record = stage.transition(make_event(family=socket.AF_INET6, saddr=v6, daddr=mapped))
    assert record["family"] == "ipv6"
    assert record["local_addr"] == "2001:db8::1"
    assert record["remote_addr"] == "10.0.0.1"


def test_iso_clock_changes_with_the_second():
    iso = IsoClock(CLOCK)
    assert iso.format(999_999_999) == "2023-11-14T22:13:20.999999Z"
    assert iso.format(1_000_000_000) == "2023-11-14T22:13:21.000000Z"
    assert iso.format(999_999_999) == "2023-11-14T22:13:20.999999Z"


def test_json_lines_stream_per_batch_then_a_summary():
    stage, out, err = output(FORMAT_JSON)
    stage.on_start()
    assert out.getvalue() == ""
    stage.on_events([make_event(), make_event(TcpState.ESTABLISHED, TcpState.FIN_WAIT1)])
    first = out.getvalue().splitlines()
    assert len(first) == 2
    summary = Summary()
    summary.record(TcpState.SYN_SENT, TcpState.ESTABLISHED, 437_200, True)
    summary.counters[0] = 1
    stage.on_finish(summary)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["type"] for r in lines] == ["transition", "transition", "summary"]
    assert lines[1]["old"] == "ESTABLISHED" and lines[1]["new"] == "FIN_WAIT1"
    assert lines[2]["written"] == 2
    assert err.getvalue() == ""


def test_json_writer_takes_any_record_kind():
    out = io.StringIO()
    JsonLinesWriter(out).write_record("lifetime", {"pid": 1, "states": {"ESTABLISHED": 5}})
    assert json.loads(out.getvalue()) == {
        "type": "lifetime",
        "pid": 1,
        "states": {"ESTABLISHED": 5},
    }


def test_json_keeps_text_as_text():
    out = io.StringIO()
    JsonLinesWriter(out).write_record("transition", {"comm": 'a"b\\c\nd é'})
    assert json.loads(out.getvalue())["comm"] == 'a"b\\c\nd é'


def test_csv_header_rows_and_summary_on_stderr():
    stage, out, err = output(FORMAT_CSV)
    stage.on_start()
    stage.on_events([make_event(), make_event(TcpState.CLOSE, TcpState.SYN_SENT, flags=0)])
    summary = Summary()
    summary.record(TcpState.SYN_SENT, TcpState.ESTABLISHED, 437_200, True)
    summary.counters[0] = 2
    stage.on_finish(summary)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == TRANSITION_FIELDS
    assert len(rows) == 2
    assert rows[0]["duration_ns"] == "437200" and rows[0]["comm"] == "curl"
    assert rows[1]["duration_ns"] == "" and rows[1]["pid"] == ""
    assert err.getvalue().splitlines()[-1] == "2 transitions traced, 2 shown, 0 lost"


def test_csv_header_comes_before_any_traffic():
    stage, out, _ = output(FORMAT_CSV)
    stage.on_start()
    assert out.getvalue() == ",".join(TRANSITION_FIELDS) + "\n"


def test_csv_writer_refuses_other_kinds():
    out = io.StringIO()
    writer = CsvWriter(out, "transition", ("a", "b"))
    assert writer.write_record("lifetime", {"a": 1}) is False
    assert out.getvalue() == ""
    assert writer.write_record("transition", {"a": 1, "b": None}) is True
    assert out.getvalue() == "a,b\n1,\n"


def test_quiet_writes_only_the_summary():
    stage, out, _ = output(FORMAT_JSON, quiet=True)
    stage.on_start()
    stage.on_events([make_event()])
    stage.on_finish(Summary())
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["written"] is None


def test_summary_record_numbers():
    s = Summary()
    for ns in (1_000_000, 3_000_000):
        s.record(TcpState.SYN_SENT, TcpState.ESTABLISHED, ns, True)
    s.record(TcpState.ESTABLISHED, TcpState.CLOSE, 0, False)
    s.record(TcpState.CLOSE, TcpState.SYN_SENT, 0, False)
    s.counters[0] = 4
    s.counters[2] = 1  # dropped
    s.lost = 2
    record = summary_record(s, written=1)
    assert record["transitions_traced"] == 4
    # the kernel's drop count and perf's lost records count the same events: the larger
    assert record["lost"] == 2
    syn = record["states"]["SYN_SENT"]
    assert syn["left"] == 2 and syn["timed"] == 2 and syn["untimed"] == 0
    assert syn["mean_ns"] == 2_000_000 and syn["max_ns"] == 3_000_000
    assert 1_000_000 <= syn["p50_ns"] <= syn["p90_ns"] <= syn["p99_ns"] <= 3_000_000
    est = record["states"]["ESTABLISHED"]
    assert est == {
        "left": 1,
        "timed": 0,
        "untimed": 1,
        "mean_ns": None,
        "p50_ns": None,
        "p90_ns": None,
        "p99_ns": None,
        "max_ns": None,
    }
    assert "CLOSE" not in record["states"]  # births have no time in CLOSE
    assert {"old": "CLOSE", "new": "SYN_SENT", "count": 1} in record["transitions"]
    json.dumps(record)  # plain values only
    assert record["faster"] is None  # no --slower-than


def test_summary_record_counts_what_was_faster_than_slower_than():
    s = Summary()
    s.counters[C_SEEN], s.counters[C_FAST] = 1200, 1186
    s.slower_than = "1s"
    record = summary_record(s, written=14)
    assert (record["transitions_traced"], record["written"]) == (1200, 14)
    assert (record["faster"], record["lost"]) == (1186, 0)
    assert list(record)[:4] == ["transitions_traced", "written", "faster", "lost"]


def varied_events():
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    yield make_event()
    yield make_event(TcpState.CLOSE, TcpState.SYN_SENT, flags=0)
    yield make_event(family=socket.AF_INET6, saddr=v6, daddr=v6, sport=0)
    yield make_event(comm=b'a"b\\c\n\xff\xfe\x00junk'.ljust(16, b"\0")[:16])
    yield make_event(TcpState.LAST_ACK, TcpState.CLOSE, delta=2**63, ts_ns=2**62)
    yield make_event(old=99, new=0)  # unknown numbers still print


def test_fast_json_line_equals_the_record():
    stage, _, _ = output(FORMAT_JSON)
    for ev in varied_events():
        assert json.loads(stage.transition_json(ev)) == {
            "type": "transition",
            **stage.transition(ev),
        }


def test_json_batch_lines_equal_the_records_with_warm_caches():
    stage, _, _ = output(FORMAT_JSON)
    events = list(varied_events())
    stage.transition_lines(events)  # fill the fragment caches
    for ev, line in zip(events, stage.transition_lines(events + events)):
        assert json.loads(line) == {"type": "transition", **stage.transition(ev)}


def test_fast_csv_row_equals_the_record():
    stage, _, _ = output(FORMAT_CSV)
    for ev in varied_events():
        record = stage.transition(ev)
        assert stage.transition_row(ev) == tuple(record[c] for c in TRANSITION_FIELDS)


def test_stuck_records_pass_quiet_and_end_with_what_is_still_stuck():
    from tcptrace.kernel.events import F_DELTA_KNOWN, F_OWNER_KNOWN, F_STUCK

    cw = TcpState.CLOSE_WAIT
    stuck = make_event(cw, cw, delta=5_000_000_000, flags=F_STUCK | F_DELTA_KNOWN | F_OWNER_KNOWN)
    out, err = io.StringIO(), io.StringIO()
    stage = RecordOutput(FORMAT_JSON, out, err, CLOCK, quiet=True, still_stuck=lambda: [stuck])
    stage.on_events([stuck])
    stage.on_finish(Summary())
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["type"] for r in records] == ["stuck", "still_stuck", "summary"]
    record = records[0]
    assert record["state"] == "CLOSE_WAIT" and record["age_ns"] == 5_000_000_000
    assert record["age_lower_bound"] is False and record["pid"] == 2588
    assert "old" not in record and "duration_ns" not in record
    assert records[2]["written"] is None


def test_lifetime_record_is_the_connections_fields_in_order():
    """The documented lifetime object: the Lifetime's fields as dataclasses.asdict gives
    them (the owner's cgroup id as a path instead), then start and end as text."""
    from dataclasses import asdict

    from tcptrace.sockets.lifetimes import Lifetime, StateTime

    life = Lifetime(
        start_ns=5_000_000_000,
        end_ns=6_500_000_000,
        pid=2588,
        comm="curl",
        family=socket.AF_INET6,
        local_addr="::1",
        local_port=42374,
        remote_addr="::1",
        remote_port=30123,
        duration_ns=1_500_000_000,
        complete=False,
        states=[StateTime("ESTABLISHED", 1_000, lower_bound=True), StateTime("FIN_WAIT1", None)],
    )
    stage, out, _ = output(FORMAT_JSON)
    record = stage.lifetime(life)
    expected = asdict(life)
    del expected["cgroup_id"]
    expected.update(netns=None, netns_name=None, cgroup=None, container=None)
    expected.update(family="ipv6", start="2023-11-14T22:13:25.000000Z")
    expected["end"] = "2023-11-14T22:13:26.500000Z"
    assert list(record.items()) == list(expected.items())
    stage._write_lifetimes([life, life])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines == [{"type": "lifetime", **expected}] * 2 and stage.written == 2
