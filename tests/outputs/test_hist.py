"""--hist: each state's log2 histogram, from a Summary alone, whatever filled it."""

from __future__ import annotations

import io
import json
import random

import pytest

from tcptrace.kernel.events import HIST_SLOTS, NCOUNTERS
from tcptrace.kernel.stats import StateStats, Summary, hist_slot
from tcptrace.outputs.export import FORMAT_CSV, FORMAT_JSON, RecordOutput, summary_record
from tcptrace.outputs.hist import (
    BAR_WIDTH,
    NO_HISTOGRAM,
    bar,
    bucket_bounds,
    format_hist,
    hist_record,
    hist_rows,
)
from tcptrace.outputs.output import Clock, format_summary
from tcptrace.sockets.timewait import Corrections
from tcptrace.states import NSTATES, TcpState

MS = 1_000_000
FULL = "*" * BAR_WIDTH


def stats_of(*durations: int) -> StateStats:
    stats = StateStats()
    for ns in durations:
        stats.add(ns)
    return stats


def summary_of(**states: StateStats) -> Summary:
    summary = Summary()
    for name, stats in states.items():
        summary.states[int(TcpState[name])] = stats
    return summary


def row_of(ns: int) -> tuple[int, int]:
    """The (low, high) of the one row a single duration lands in."""
    rows = hist_rows(stats_of(ns))
    assert len(rows) == 1 and rows[0][2] == 1, rows
    return rows[0][:2]


@pytest.mark.parametrize("power", range(1, 64))
def test_a_power_of_two_opens_its_row_and_the_ns_before_it_closes_the_last(power):
    edge = 1 << power
    assert row_of(edge) == (edge, edge * 2)
    assert row_of(edge * 2 - 1) == (edge, edge * 2)
    if power > 1:
        assert row_of(edge - 1) == (edge // 2, edge)


def test_the_first_row_holds_0_and_1_ns():
    assert row_of(0) == (0, 2) == bucket_bounds(0)
    assert row_of(1) == (0, 2)
    assert row_of(2) == (2, 4) == bucket_bounds(1)


def test_the_sub_buckets_of_a_power_add_up_in_its_row():
    # 2**20 ns split in the kernel's sub-buckets: eight durations in eight slots
    low = 1 << 20
    durations = [low + i * (low // 8) for i in range(8)]
    assert len({hist_slot(ns) for ns in durations}) == 8
    assert hist_rows(stats_of(*durations)) == [(low, 2 * low, 8)]


def test_any_duration_lands_in_the_row_that_holds_it():
    rng = random.Random(24)
    for _ in range(2000):
        ns = rng.getrandbits(rng.randrange(1, 64))
        low, high = row_of(ns)
        assert low <= ns < high


def test_rows_run_from_the_first_to_the_last_non_empty_with_zeros_between():
    stats = stats_of(300_000, 300_000, 95 * MS)
    rows = hist_rows(stats)
    assert rows[0] == (1 << 18, 1 << 19, 2)
    assert rows[-1] == (1 << 26, 1 << 27, 1)
    assert [n for _, _, n in rows[1:-1]] == [0] * 7
    assert sum(n for _, _, n in rows) == stats.count


def test_no_row_without_a_timed_duration():
    assert hist_rows(StateStats(unknown=3)) == []


@pytest.mark.parametrize(
    "count,largest,stars",
    [(40, 40, 40), (20, 40, 20), (39, 40, 39), (1, 40, 1), (1, 1000, 1), (999, 1000, 40)],
)
def test_bars_scale_to_the_largest_row_rounded_up(count, largest, stars):
    assert bar(count, largest) == "*" * stars


def test_an_empty_row_has_no_bar():
    assert bar(0, 40) == ""


def test_a_state_reads_like_bccs_print_log2_hist():
    summary = summary_of(ESTABLISHED=stats_of(*[95 * MS] * 10, 300_000, 300_000, 300_000))
    assert format_hist(summary) == (
        "ESTABLISHED: 13 left\n"
        "     time in ESTABLISHED : count     distribution\n"
        f"   262.1µs -> 524.3µs    : 3        |{'*' * 12:<40}|\n"
        f"   524.3µs -> 1.05ms     : 0        |{'':<40}|\n"
        f"    1.05ms -> 2.10ms     : 0        |{'':<40}|\n"
        f"    2.10ms -> 4.19ms     : 0        |{'':<40}|\n"
        f"    4.19ms -> 8.39ms     : 0        |{'':<40}|\n"
        f"    8.39ms -> 16.78ms    : 0        |{'':<40}|\n"
        f"   16.78ms -> 33.55ms    : 0        |{'':<40}|\n"
        f"   33.55ms -> 67.11ms    : 0        |{'':<40}|\n"
        f"   67.11ms -> 134.22ms   : 10       |{FULL}|\n"
    )


def test_labels_use_the_summarys_units_down_to_ns_and_up_to_minutes():
    text = format_hist(summary_of(SYN_SENT=stats_of(5, 100 * 10**9)))
    lines = text.splitlines()
    assert lines[2].startswith("       4ns -> 8ns        : 1 ")
    assert lines[-1].startswith("     1m08s -> 2m17s      : 1 ")


def test_a_wide_count_widens_the_count_column_of_its_state():
    stats = StateStats()
    stats.hist[hist_slot(MS)] = 123_456_789
    stats.hist[hist_slot(4 * MS)] = 1
    stats.count = 123_456_790
    lines = format_hist(summary_of(ESTABLISHED=stats)).splitlines()
    assert lines[1].endswith(": count      distribution")
    assert lines[2].endswith(f": 123456789 |{FULL}|")
    assert lines[-1].endswith(f": 1         |{'*':<40}|")
    # the bars still line up under the heading
    assert {line.index("|") for line in lines[2:]} == {lines[1].index("distribution") - 1}


def test_untimed_exits_are_said_in_one_line_not_in_a_row():
    stats = stats_of(95 * MS, 95 * MS)
    stats.unknown = 3
    lines = format_hist(summary_of(ESTABLISHED=stats)).splitlines()
    # the header counts every exit, as the summary's LEFT column; the rows the timed ones
    assert lines[0] == "ESTABLISHED: 5 left"
    assert lines[2].split(":")[1].split()[0] == "2"
    assert lines[3:] == ["3 left after an unknown time (UNTIMED): not in the histogram"]


def test_a_state_left_only_after_unknown_times_has_no_rows():
    lines = format_hist(summary_of(CLOSE_WAIT=StateStats(unknown=2))).splitlines()
    assert lines == [
        "CLOSE_WAIT: 2 left",
        "2 left after an unknown time (UNTIMED): not in the histogram",
    ]


def test_states_in_the_summarys_order_and_only_those_left():
    summary = summary_of(
        TIME_WAIT=stats_of(60 * 10**9),
        ESTABLISHED=stats_of(MS),
        LISTEN=stats_of(10**9),
        SYN_SENT=StateStats(),  # entered, never left
    )
    heads = [line for line in format_hist(summary).splitlines() if line.endswith(" left")]
    assert heads == ["LISTEN: 1 left", "ESTABLISHED: 1 left", "TIME_WAIT: 1 left"]
    # a blank line between states
    assert "\n\nESTABLISHED: 1 left\n" in format_hist(summary)


def test_an_empty_summary_says_so_in_one_line():
    assert format_hist(Summary()) == NO_HISTOGRAM + "\n"
    assert format_hist(summary_of(SYN_SENT=StateStats())) == NO_HISTOGRAM + "\n"


def test_the_kernels_maps_and_python_events_give_the_same_histograms():
    durations = [0, 7, 8, 1000, 250_000, 95 * MS, 95 * MS, 3 * 10**9]
    hist = [0] * (NSTATES * HIST_SLOTS)
    dsum, dmax = [0] * NSTATES, [0] * NSTATES
    trans = [0] * (NSTATES * NSTATES)
    est = int(TcpState.ESTABLISHED)
    for ns in durations:
        hist[est * HIST_SLOTS + hist_slot(ns)] += 1
        dsum[est] += ns
        dmax[est] = max(dmax[est], ns)
    trans[est * NSTATES + int(TcpState.FIN_WAIT1)] = len(durations) + 1  # one untimed
    kernel = Summary.from_maps(hist, dsum, dmax, trans, [0] * NCOUNTERS)
    replayed = Summary()
    for ns in durations:
        replayed.record(est, int(TcpState.FIN_WAIT1), ns, True)
    replayed.record(est, int(TcpState.FIN_WAIT1), 0, False)
    assert format_hist(kernel) == format_hist(replayed)
    assert "1 left after an unknown time" in format_hist(kernel)


def test_time_wait_followed_in_user_space_is_in_its_histogram():
    # TIME_WAIT's end is never traced by the kernel: TimeWait adds it at exit
    summary = Summary()
    fixes = Corrections()
    fixes.add(int(TcpState.TIME_WAIT), 60 * 10**9)
    fixes.add(int(TcpState.FIN_WAIT2), 5 * MS)
    fixes.apply_to(summary)
    text = format_hist(summary)
    assert "TIME_WAIT: 1 left" in text and "FIN_WAIT2: 1 left" in text
    assert "   34.360s -> 1m08s      : 1 " in text  # 2**35 ns <= 60 s < 2**36 ns
    # and what it takes back leaves the rows too
    back = Corrections()
    back.remove(int(TcpState.FIN_WAIT2), 5 * MS)
    back.apply_to(summary)
    assert "FIN_WAIT2" not in format_hist(summary)


def test_json_rows_are_the_text_rows():
    stats = stats_of(300_000, 95 * MS)
    assert hist_record(stats) == [
        {"low_ns": low, "high_ns": high, "count": n} for low, high, n in hist_rows(stats)
    ]
    summary = summary_of(ESTABLISHED=stats, CLOSE_WAIT=StateStats(unknown=1))
    record = summary_record(summary, written=None, hist=True)
    assert record["states"]["ESTABLISHED"]["hist"][0] == {
        "low_ns": 1 << 18,
        "high_ns": 1 << 19,
        "count": 1,
    }
    assert record["states"]["CLOSE_WAIT"]["hist"] == []
    # without --hist the summary object is as it was
    assert "hist" not in summary_record(summary, written=None)["states"]["ESTABLISHED"]


def _finish(fmt: str, hist: bool) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    stage = RecordOutput(fmt, out, err, Clock(), quiet=True, hist=hist)
    stage.on_start()
    stage.on_finish(summary_of(ESTABLISHED=stats_of(95 * MS)))
    return out.getvalue(), err.getvalue()


def test_csv_prints_the_histograms_after_the_summary_on_stderr():
    out, err = _finish(FORMAT_CSV, hist=True)
    assert "ESTABLISHED: 1 left" not in out
    summary = format_summary(summary_of(ESTABLISHED=stats_of(95 * MS)), None)
    assert err == summary + "\n" + format_hist(summary_of(ESTABLISHED=stats_of(95 * MS)))
    assert "time in" not in _finish(FORMAT_CSV, hist=False)[1]


def test_json_keeps_stdout_json_lines():
    out, err = _finish(FORMAT_JSON, hist=True)
    assert err == ""
    (line,) = out.splitlines()
    rows = json.loads(line)["states"]["ESTABLISHED"]["hist"]
    assert rows == [{"low_ns": 1 << 26, "high_ns": 1 << 27, "count": 1}]


@pytest.mark.parametrize("quiet", [False, True])
def test_the_text_output_prints_them_right_after_the_summary(quiet):
    from tcptrace.session import Options, TextOutput

    summary = summary_of(ESTABLISHED=stats_of(95 * MS))
    out = io.StringIO()
    stage = TextOutput(out, Options(quiet=quiet, hist=True))
    stage.on_finish(summary)
    text = out.getvalue()
    assert text.endswith(
        format_summary(summary, None if quiet else 0) + "\n" + format_hist(summary)
    )
    plain = io.StringIO()
    TextOutput(plain, Options(quiet=quiet)).on_finish(summary)
    assert "time in" not in plain.getvalue()


def test_the_lifetime_output_prints_them_after_its_summary():
    from tcptrace.session import LifetimeOutput, Options

    summary = summary_of(ESTABLISHED=stats_of(95 * MS))
    out = io.StringIO()
    LifetimeOutput(out, Options(lifetime=True, hist=True)).on_finish(summary)
    assert out.getvalue().endswith("\n" + format_hist(summary))
