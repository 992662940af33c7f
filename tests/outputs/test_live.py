"""--interval: the table's numbers, colour only where it belongs, frames on time."""

import copy
import io
import re

import pytest

from tcptrace.kernel.stats import StateStats, Summary
from tcptrace.outputs.live import CLEAR_SCREEN, IntervalView, LiveTable, interval_stats, want_color
from tcptrace.states import TcpState as S

SGR = re.compile(r"\x1b\[[0-9;]*m")


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    "stream,no_color,env,expected",
    [
        (Terminal(), False, {}, True),
        (io.StringIO(), False, {}, False),  # a pipe or a file: never
        (Terminal(), True, {}, False),  # --no-color
        (Terminal(), False, {"NO_COLOR": "1"}, False),
        (Terminal(), False, {"NO_COLOR": ""}, True),  # no-color.org: empty means unset
    ],
)
def test_want_color(stream, no_color, env, expected):
    assert want_color(stream, no_color, env) is expected


def connections(n, summary=None, hold_ns=1_000_000):
    summary = summary or Summary()
    for _ in range(n):
        summary.record(S.CLOSE, S.SYN_SENT, 0, False)
        summary.record(S.SYN_SENT, S.ESTABLISHED, 50_000, True)
        summary.record(S.ESTABLISHED, S.FIN_WAIT1, hold_ns, True)
    summary.counters[0] += 3 * n
    return summary


def rows(text):
    return {line.split()[0]: line.split()[1:] for line in text.splitlines()[2:]}


def test_table_counts_the_interval_and_the_present():
    before = connections(2)
    now = connections(3, connections(2))
    now.record(S.CLOSE, S.SYN_SENT, 0, False)  # one connect still pending
    now.counters[0] += 1
    text = LiveTable(color=False).render(now, before, 2.0, 0.0)
    assert "  10 transitions in 2.0s (5/s), 0 lost  total 16, 0 lost" in text
    assert text.splitlines()[1].split() == ["STATE", "ENTER", "LEAVE", "NOW", "p50", "p90", "p99"]
    table = rows(text)
    assert table["SYN_SENT"][:3] == ["4", "3", "1"]
    assert table["ESTABLISHED"][:3] == ["3", "3", "0"]
    assert table["FIN_WAIT1"][:3] == ["3", "0", "5"]  # 5 in FIN_WAIT1 since start
    assert table["SYN_SENT"][3] == "50.0µs"
    assert table["FIN_WAIT1"][3:] == ["-", "-", "-"]  # nothing left it: no durations
    assert table["CLOSE"][2] == "-"
    assert "LISTEN" not in table  # never seen: not shown
    assert not SGR.search(text)


def test_colour_codes_only_when_asked():
    now = connections(1)
    plain = LiveTable(color=False).render(now, Summary(), 1.0, 0.0)
    painted = LiveTable(color=True).render(now, Summary(), 1.0, 0.0)
    assert SGR.search(painted)
    assert SGR.sub("", painted) == plain


def test_interval_durations_are_those_of_the_interval():
    before = StateStats()
    for _ in range(100):
        before.add(1_000)
    now = StateStats()
    now.merge(before)
    for _ in range(10):
        now.add(5_000_000)
    part = interval_stats(now, before)
    assert part.count == 10
    assert part.total_ns == 50_000_000
    assert part.percentile(50) == pytest.approx(5_000_000, rel=0.13)


def test_empty_table_says_so():
    assert "(no transitions yet)" in LiveTable().render(Summary(), Summary(), 1.0, 0.0)


class Readings:
    def __init__(self):
        self.summary = Summary()
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return copy.deepcopy(self.summary)  # a fresh reading, as the probe gives


def test_view_prints_a_frame_per_interval_in_a_pipe():
    out, readings = io.StringIO(), Readings()
    view = IntervalView(out, readings, interval_s=1.0)
    view.on_start()
    start = view.previous_ns
    view.on_tick(start + 500_000_000)
    assert out.getvalue() == ""
    connections(1, readings.summary)
    view.on_tick(start + 1_000_000_000)
    view.on_tick(start + 1_200_000_000)
    view.on_tick(start + 2_000_000_000)
    frames = out.getvalue().split("\n\n")
    assert len(frames) == 2
    assert rows(frames[0])["SYN_SENT"][:3] == ["1", "1", "0"]
    assert rows(frames[1])["SYN_SENT"][:3] == ["0", "0", "0"]
    assert CLEAR_SCREEN not in out.getvalue()
    assert readings.calls == 2  # one per frame


def test_view_redraws_in_place_on_a_terminal():
    out = Terminal()
    view = IntervalView(out, Readings(), interval_s=0.5, color=True, redraw=True)
    view.on_start()
    view.on_tick(view.previous_ns + 500_000_000)
    view.on_tick(view.previous_ns + 500_000_000)
    assert out.getvalue().count(CLEAR_SCREEN) == 2
    assert out.getvalue().startswith(CLEAR_SCREEN)


def test_a_slow_tick_does_not_pile_up_frames():
    out = io.StringIO()
    view = IntervalView(out, Readings(), interval_s=0.1)
    view.on_start()
    view.on_tick(view.previous_ns + 1_000_000_000)  # ten intervals late
    view.on_tick(view.previous_ns + 1_000_000)
    assert out.getvalue().count("STATE") == 1


def test_oldest_and_stuck_columns():
    from tcptrace.sockets.stuck import Oldest

    now = connections(2)
    cw = int(S.CLOSE_WAIT)
    oldest = Oldest(
        0, {cw: (75_000_000_000, True), int(S.FIN_WAIT1): (2_000_000, False)}, {}, {cw: 3}
    )
    text = LiveTable(color=False, stuck=True).render(now, Summary(), 1.0, 0.0, oldest)
    header = text.splitlines()[1].split()
    assert header[:6] == ["STATE", "ENTER", "LEAVE", "NOW", "OLDEST", "STUCK"]
    table = rows(text)
    assert table["CLOSE_WAIT"][3:5] == [">=1m15s", "3"]  # shown though no flow: it has a socket
    assert table["FIN_WAIT1"][3:5] == ["2.00ms", "0"]
    assert table["SYN_SENT"][3] == "-"


@pytest.mark.parametrize(
    "width,header",
    [
        (None, ["STATE", "ENTER", "LEAVE", "NOW", "OLDEST", "STUCK", "p50", "p90", "p99"]),
        (80, ["STATE", "ENTER", "LEAVE", "NOW", "OLDEST", "STUCK", "p50", "p90"]),
        (60, ["STATE", "ENTER", "LEAVE", "NOW", "OLDEST", "STUCK"]),
        (50, ["STATE", "ENTER", "LEAVE", "NOW", "OLDEST"]),
        (40, ["STATE", "ENTER", "LEAVE", "NOW"]),
        (30, ["STATE", "ENTER", "NOW"]),
        (21, ["STATE", "NOW"]),
    ],
)
def test_a_narrow_terminal_drops_columns_and_no_line_wraps(width, header):
    """tmux at 60 or 50 columns once wrapped every row ('...lost  tota' / 'l 0, 0 lost')."""
    from tcptrace.sockets.stuck import Oldest

    oldest = Oldest(0, {int(S.CLOSE_WAIT): (75_000_000_000, True)}, {}, {int(S.CLOSE_WAIT): 3})
    text = LiveTable(stuck=True).render(connections(2), Summary(), 1.0, 0.0, oldest, width)
    lines = text.splitlines()
    assert lines[1].split() == header
    if width is not None:
        assert max(len(line) for line in lines) <= width
    assert rows(text)["CLOSE_WAIT"][header.index("NOW") - 1] == "0"  # the walk's count
