import io
import socket

import pytest

from tcptrace.events import EVENT_STRUCT, F_DELTA_KNOWN, F_OWNER_KNOWN, decode
from tcptrace.output import (
    TS_ISO,
    TS_NONE,
    TS_RELATIVE,
    Clock,
    TextFormatter,
    endpoint,
    format_duration,
    format_summary,
    port_name,
)
from tcptrace.states import TcpState
from tcptrace.stats import Summary


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
        pid=2588,
        flags=F_DELTA_KNOWN | F_OWNER_KNOWN if flags is None else flags,
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


def test_owner_resolver_used_for_unattributed_events():
    fmt = TextFormatter(
        io.StringIO(), Clock(TS_NONE), numeric=True, resolve_owner=lambda ev: (77, "nginx")
    )
    assert fmt.line(make_event(flags=F_DELTA_KNOWN)).split()[0:2] == ["77", "nginx"]


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
