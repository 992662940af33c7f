import io
import socket
import time

import pytest

from tcptrace.kernel.events import EVENT_STRUCT, F_DELTA_KNOWN, F_DELTA_LOWER, F_OWNER_KNOWN, decode
from tcptrace.kernel.stats import Summary
from tcptrace.outputs.output import (
    TS_ISO,
    TS_NONE,
    TS_RELATIVE,
    TS_WALL,
    Clock,
    LifetimeFormatter,
    TextFormatter,
    endpoint,
    format_duration,
    format_snapshot,
    format_summary,
    port_name,
    printable,
)
from tcptrace.sockets.lifetimes import Lifetime, StateTime
from tcptrace.sockets.procs import Owner
from tcptrace.sockets.snapshot import SnapshotRow
from tcptrace.sockets.sockdiag import SockEntry
from tcptrace.states import TcpState


@pytest.mark.parametrize(
    "ns,text",
    [
        (0, "0ns"),
        (850, "850ns"),
        (12_345, "12.3µs"),
        (1_234_567, "1.23ms"),
        (4_560_000_000, "4.560s"),
        (123 * 10**9, "2m03s"),
        (2 * 3600 * 10**9 + 5 * 60 * 10**9, "2h05m"),
    ],
)
def test_format_duration(ns, text):
    assert format_duration(ns) == text


def test_port_names():
    assert port_name(443, numeric=True) == "443"
    assert port_name(0, numeric=True) == "*"
    assert port_name(22, numeric=False) in ("ssh", "22")  # /etc/services may be absent


def test_endpoint_brackets_ipv6():
    raw = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    assert endpoint(socket.AF_INET6, raw, 443, numeric=True) == "[2001:db8::1]:443"
    v4 = socket.inet_pton(socket.AF_INET, "127.0.0.1").ljust(16, b"\0")
    assert endpoint(socket.AF_INET, v4, 8080, numeric=True) == "127.0.0.1:8080"


def make_event(old=TcpState.SYN_SENT, new=TcpState.ESTABLISHED, delta=437_200, flags=None, **kw):
    fields = dict(
        ts_ns=5_000_000_000,
        delta_ns=delta,
        skaddr=1,
        cgroup_id=0,
        pid=2588,
        flags=F_DELTA_KNOWN | F_OWNER_KNOWN if flags is None else flags,
        netns=0,
        jiffies=0,
        saddr=socket.inet_pton(socket.AF_INET, "127.0.0.1").ljust(16, b"\0"),
        daddr=socket.inet_pton(socket.AF_INET, "127.0.0.1").ljust(16, b"\0"),
        sport=42374,
        dport=30123,
        family=socket.AF_INET,
        oldstate=old,
        newstate=new,
        comm=b"curl".ljust(16, b"\0"),
    )
    fields.update(kw)
    return decode(EVENT_STRUCT.pack(*fields.values()))


def test_text_line_columns():
    clock = Clock(TS_RELATIVE, start_mono_ns=4_000_000_000)
    fmt = TextFormatter(io.StringIO(), clock, numeric=True)
    line = fmt.line(make_event())
    assert line.split() == [
        "1.000000",
        "2588",
        "curl",
        "127.0.0.1:42374",
        "127.0.0.1:30123",
        "SYN_SENT",
        "->",
        "ESTABLISHED",
        "437.2µs",
    ]
    # header and line columns line up: "->" sits at the same offset
    header = fmt.header()
    assert header.index("->") == line.index("->")


def test_unknown_owner_and_duration_are_dashes():
    fmt = TextFormatter(io.StringIO(), Clock(TS_NONE), numeric=True)
    parts = fmt.line(make_event(flags=0)).split()
    assert parts[0:2] == ["-", "-"]
    assert parts[-1] == "-"


def test_lower_bound_duration_is_marked():
    fmt = TextFormatter(io.StringIO(), Clock(TS_NONE), numeric=True)
    ev = make_event(delta=1_200_000_000, flags=F_OWNER_KNOWN | F_DELTA_LOWER)
    assert fmt.line(ev).split()[-1] == ">=1.200s"
    assert fmt.line(ev).split()[0:2] == ["2588", "curl"]


def test_lifetime_line():
    life = Lifetime(
        start_ns=1_000_000_000,
        end_ns=2_500_000_000,
        pid=2590,
        comm="client",
        family=socket.AF_INET,
        local_addr="127.0.0.1",
        local_port=42374,
        remote_addr="127.0.0.1",
        remote_port=30123,
        duration_ns=1_500_000_000,
        complete=True,
        states=[
            StateTime("SYN_SENT", 210_000),
            StateTime("ESTABLISHED", 1_200_000_000),
            StateTime("TIME_WAIT", None),
        ],
    )
    fmt = LifetimeFormatter(io.StringIO(), Clock(TS_NONE), numeric=True)
    assert fmt.line(life).split() == [
        "2590",
        "client",
        "127.0.0.1:42374",
        "127.0.0.1:30123",
        "1.500s",
        "SYN_SENT",
        "210.0µs",
        "ESTABLISHED",
        "1.200s",
        "TIME_WAIT",
        "?",
    ]
    assert fmt.header().index("LIFETIME") < fmt.header().index("STATES")
    life.complete, life.pid = False, 0
    life.states[0] = StateTime("ESTABLISHED", 3_000_000_000, lower_bound=True)
    parts = fmt.line(life).split()
    assert parts[:2] == ["-", "-"] and parts[4] == ">=1.500s" and parts[6] == ">=3.000s"


def test_snapshot_table_like_ss():
    listener = SockEntry(socket.AF_INET6, TcpState.LISTEN, "::", 443, "::", 0, 4242, 33, 1, 0, 0)
    conn = SockEntry(
        socket.AF_INET, TcpState.ESTABLISHED, "10.0.0.1", 443, "10.0.0.2", 50000, 0, 0, 2, 0, 0
    )
    rows = [SnapshotRow(listener, Owner(77, "nginx")), SnapshotRow(conn, None)]
    lines = format_snapshot(rows, numeric=True, extended=True).splitlines()
    assert lines[0].split() == ["STATE", "LOCAL", "REMOTE", "PID", "COMM", "UID", "INODE"]
    assert lines[1].split() == ["LISTEN", "[::]:443", "[::]:*", "77", "nginx", "33", "4242"]
    assert lines[2].split() == ["ESTABLISHED", "10.0.0.1:443", "10.0.0.2:50000", "-", "-", "0", "0"]
    short = format_snapshot(rows, numeric=True).splitlines()
    assert short[0].split() == ["STATE", "LOCAL", "REMOTE", "PID", "COMM"]


def test_summary_notes_follow_the_accounting():
    s = Summary()
    s.notes.append("TIME_WAIT: 3 closing sockets not followed")
    assert format_summary(s).splitlines()[-1] == "TIME_WAIT: 3 closing sockets not followed"


def test_ipv6_widens_columns_and_stays_aligned():
    out = io.StringIO()
    fmt = TextFormatter(out, Clock(TS_NONE), numeric=True)
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8:1234:5678:9abc:def0:1234:5678")
    fmt.write([make_event(family=socket.AF_INET6, saddr=v6, daddr=v6)])
    assert fmt.width > 21
    assert fmt.header().index("->") == out.getvalue().index("->")
    assert fmt.printed == 1


def test_iso_clock():
    clock = Clock(TS_ISO, start_mono_ns=0, offset_ns=1_700_000_000 * 10**9)
    assert clock.format(1_500) == "2023-11-14T22:13:20.000001Z"


def test_summary_table():
    s = Summary()
    s.record(TcpState.SYN_SENT, TcpState.ESTABLISHED, 1_000_000, True)
    s.record(TcpState.SYN_SENT, TcpState.ESTABLISHED, 3_000_000, True)
    s.record(TcpState.ESTABLISHED, TcpState.CLOSE, 0, False)
    s.counters[0] = 3
    text = format_summary(s, printed=3)
    lines = text.splitlines()
    assert lines[0].split() == ["STATE", "LEFT", "MEAN", "p50", "p90", "p99", "MAX", "UNTIMED"]
    syn = next(line for line in lines if line.startswith("SYN_SENT")).split()
    assert syn[1] == "2" and syn[2] == "2.00ms" and syn[6] == "3.00ms" and syn[7] == "0"
    est = next(line for line in lines if line.startswith("ESTABLISHED")).split()
    assert est[1] == "1" and est[-1] == "1"
    assert lines[-1] == "3 transitions traced, 3 shown, 0 lost"


def test_summary_empty():
    assert "(no transitions)" in format_summary(Summary())


def test_write_all_delivers_everything_through_a_full_pipe_and_a_signal():
    """Lines reach a slow reader intact although the pipe fills and a signal arrives.

    (The failure this guards against, sys.stdout dropping the rest of a blocked
    write when tcptrace's SIGINT handler runs, is reproduced end to end by
    tests/integration/test_wire_speed.py.)
    """
    import os
    import signal
    import subprocess
    import tempfile

    from tcptrace.outputs.output import write_all

    rfd, wfd = os.pipe()
    text = "".join(f"line {i:07d}\n" for i in range(100_000))  # far beyond a pipe's 64 KiB
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    with tempfile.TemporaryFile() as sink:
        reader = subprocess.Popen(
            ["sh", "-c", f"sleep 0.2; kill -USR1 {os.getpid()}; sleep 0.2; exec cat"],
            stdin=rfd,
            stdout=sink,
        )
        os.close(rfd)
        try:
            with os.fdopen(wfd, "w") as out:
                write_all(out, text)
        finally:
            reader.wait(timeout=10)
            signal.signal(signal.SIGUSR1, old)
        sink.seek(0)
        assert sink.read().decode() == text


def test_write_all_to_a_stream_without_a_file():
    from tcptrace.outputs.output import write_all

    out = io.StringIO()
    write_all(out, "a\nb\n")
    assert out.getvalue() == "a\nb\n"


def test_accounting_counts_drops_once_and_shed_events():
    from tcptrace.kernel.events import C_DROPPED, C_SEEN, C_SHED
    from tcptrace.outputs.output import format_accounting

    s = Summary()
    s.counters[C_SEEN] = 100
    s.counters[C_DROPPED] = 7
    s.counters[C_SHED] = 20
    s.lost = 7  # the ring's report of the same 7 dropped events
    assert format_accounting(s, 73) == "100 transitions traced, 73 shown, 27 lost"


@pytest.mark.parametrize("style", [TS_WALL, TS_RELATIVE, TS_NONE])
def test_batch_durations_match_format_duration_with_warm_caches(style):
    deltas = [0, 999, 1_000, 1_049, 1_050, 45_300, 999_949, 999_950, 1_000_000, 2_500_000_000]
    deltas += [960, 1_040]  # around the first µs: the µs cache must not answer for ns
    fmt = TextFormatter(io.StringIO(), Clock(style), numeric=True)
    events = [make_event(delta=d) for d in deltas]
    fmt.lines(events)  # fill the caches
    for delta, line in zip(deltas, fmt.lines(events)):
        assert line.endswith(f" {format_duration(delta):>9}"), (delta, line)


def test_wall_time_column():
    clock = Clock(TS_WALL, offset_ns=0)
    fmt = TextFormatter(io.StringIO(), clock, numeric=True)
    ev = make_event(ts_ns=3_600_000_000_000 + 1_234_567_890)
    stamp = time.strftime("%H:%M:%S", time.localtime(3_601)) + ".234567"
    assert fmt.line(ev).split()[0] == stamp


@pytest.mark.parametrize(
    "name,shown",
    [
        ("curl", "curl"),
        ("t\tb\nn\x1b[31mR", "t?b?n?[31mR"),
        ("a\x9bb\x7fc", "a?b?c"),  # C1 CSI and DEL
        ("x\u202ey", "x?y"),  # a bidi override reorders what follows
        ("café", "café"),
    ],
)
def test_printable_names_as_ps_shows_them(name, shown):
    assert printable(name) == shown


def test_control_characters_in_a_comm_never_reach_the_text():
    comm = b"t\tb\nn\x1b[31mR".ljust(16, b"\0")
    fmt = TextFormatter(io.StringIO(), Clock(TS_NONE), numeric=True)
    line = fmt.line(make_event(comm=comm))
    assert line.split()[:2] == ["2588", "t?b?n?[31mR"]
    assert fmt.header().index("->") == line.index("->")


FULL_V6 = "2001:db8:1234:5678:9abc:def0:1234:5678"


def aligned_under_headers(text: str, mark, header_mark: str) -> None:
    """Every line's column mark(line) sits under the `header_mark` of the latest header."""
    column = None
    lines = text.splitlines()
    for line in lines:
        if line.lstrip().startswith("PID"):
            column = line.index(header_mark)
        else:
            assert column is not None and mark(line) == column, text
    assert len(lines) >= 3


def test_a_long_ipv6_address_reprints_the_header_and_every_line_stays_aligned():
    out = io.StringIO()
    fmt = TextFormatter(out, Clock(TS_NONE), numeric=True)
    fmt.write_header()
    fmt.write([make_event()])
    v6 = socket.inet_pton(socket.AF_INET6, FULL_V6)
    fmt.write([make_event(), make_event(family=socket.AF_INET6, saddr=v6, daddr=v6)])
    fmt.write([make_event(), make_event(family=socket.AF_INET6, saddr=v6, daddr=v6)])
    text = out.getvalue()
    assert text.count("PID") == 2  # widened once, for any IPv6 address to come
    assert fmt.printed == 5
    aligned_under_headers(text, lambda line: line.index("->"), "->")


def test_a_long_ipv6_address_keeps_lifetime_lines_aligned():
    def life(addr):
        return Lifetime(1, 2, 7, "x", socket.AF_INET6, addr, 5, addr, 6, 1, True)

    out = io.StringIO()
    fmt = LifetimeFormatter(out, Clock(TS_NONE), numeric=True)
    fmt.write_header()
    fmt.write([life("::1")])
    fmt.write([life("::1"), life(FULL_V6)])
    text = out.getvalue()
    assert text.count("PID") == 2
    aligned_under_headers(text, lambda line: line.rindex("["), "REMOTE")


class _Names:
    def name(self, inode: int):
        return {11: "blue", 12: "red"}.get(inode)


class _Paths:
    def path(self, cgroup_id: int):
        return {
            5: "/system.slice/nginx.service",
            6: "/advtest/averyveryverylongcgroupname-abcdef",
            7: "/advtest/averyveryverylongcgroupname-ghijkl",
        }.get(cgroup_id)


def test_namespace_columns_grow_with_the_second_namespace():
    from tcptrace.sockets.places import Places

    out = io.StringIO()
    places = Places(_Names(), _Paths())  # type: ignore[arg-type]
    fmt = TextFormatter(out, Clock.now("none"), numeric=True, places=places)
    fmt.write_header()
    fmt.write([make_event(netns=11, cgroup_id=5)])  # one namespace: the usual columns
    fmt.write([make_event(netns=11, cgroup_id=5), make_event(netns=12, cgroup_id=5)])
    lines = out.getvalue().splitlines()
    assert "NETNS" not in lines[0] and "blue" not in lines[1]
    assert lines[2].split()[2:4] == ["NETNS", "CGROUP"]  # a header as the columns grow
    assert lines[3].split()[2:4] == ["blue", "nginx.service"]  # the whole batch has them
    assert lines[4].split()[2:4] == ["red", "nginx.service"]
    assert len({len(line) for line in lines[2:]}) == 1  # aligned


def test_wide_shows_the_columns_from_the_start():
    from tcptrace.sockets.places import Places

    out = io.StringIO()
    fmt = TextFormatter(
        out, Clock.now("none"), numeric=True, places=Places(_Names(), _Paths()), wide=True
    )  # type: ignore[arg-type]
    fmt.write_header()
    fmt.write([make_event(netns=11, cgroup_id=0, flags=0)])
    header, line = out.getvalue().splitlines()
    assert header.split()[2:4] == ["NETNS", "CGROUP"]
    assert line.split()[:4] == ["-", "-", "blue", "-"]


def test_a_long_cgroup_path_keeps_its_end_which_tells_siblings_apart():
    """Once both showed as '/advtest/averyveryve'."""
    from tcptrace.sockets.places import Places

    out = io.StringIO()
    fmt = TextFormatter(
        out, Clock.now("none"), numeric=True, places=Places(_Names(), _Paths()), wide=True
    )  # type: ignore[arg-type]
    fmt.write_header()
    fmt.write([make_event(netns=11, cgroup_id=6), make_event(netns=11, cgroup_id=7)])
    header, first, second = out.getvalue().splitlines()
    assert first.split()[3] == "…ngcgroupname-abcdef"
    assert second.split()[3] == "…ngcgroupname-ghijkl"
    assert len({len(header), len(first), len(second)}) == 1  # still aligned


def test_a_stuck_report_reads_state_and_age():
    from tcptrace.kernel.events import F_STUCK

    clock = Clock(TS_RELATIVE, start_mono_ns=4_000_000_000)
    fmt = TextFormatter(io.StringIO(), clock, numeric=True)
    cw = TcpState.CLOSE_WAIT
    stuck = make_event(cw, cw, delta=31_200_000_000, flags=F_STUCK | F_DELTA_KNOWN | F_OWNER_KNOWN)
    assert fmt.line(stuck).split()[-4:] == ["STUCK", "in", "CLOSE_WAIT", "31.200s"]
    lower = stuck._replace(flags=F_STUCK | F_DELTA_LOWER | F_OWNER_KNOWN)
    assert fmt.line(lower).split()[-1] == ">=31.200s"
    fmt.write([stuck], transitions=False)
    assert fmt.printed == 0  # not a transition shown
    fmt.write_still_stuck([stuck, lower])
    text = fmt.out.getvalue().splitlines()
    assert "2 still stuck at exit, oldest first:" in text
    assert text[-1].endswith(">=31.200s") and text[-3].split()[1] == "PID"
