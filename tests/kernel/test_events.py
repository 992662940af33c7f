from __future__ import annotations

import socket

from tcptrace.kernel.events import (
    EVENT_SIZE,
    EVENT_STRUCT,
    F_DELTA_KNOWN,
    F_OWNER_KNOWN,
    LIFE_STRUCT,
    LIFE_VISITS,
    decode,
    decode_life,
    decode_many,
    format_addr,
    raw_address,
)
from tcptrace.states import TcpState as S


def raw_event(**kw) -> bytes:
    values = dict(
        ts_ns=123,
        delta_ns=456,
        skaddr=0xFFFF888012345678,
        cgroup_id=77,
        pid=42,
        flags=F_DELTA_KNOWN | F_OWNER_KNOWN,
        netns=4026531840,
        reserved=0,
        saddr=socket.inet_pton(socket.AF_INET, "10.0.0.1").ljust(16, b"\0"),
        daddr=socket.inet_pton(socket.AF_INET, "10.0.0.2").ljust(16, b"\0"),
        sport=40000,
        dport=443,
        family=socket.AF_INET,
        oldstate=2,
        newstate=1,
        comm=b"curl".ljust(16, b"\0"),
    )
    values.update(kw)
    # the kernel pads perf samples past the struct: decoding must ignore the tail
    return EVENT_STRUCT.pack(*values.values()) + b"\0\0\0\0"


def raw_life(birth_ns: int, visited: list[tuple[int, int]], visits: int | None = None, **ev):
    """A life record: the closing event's fields, then the states and their times."""
    event = EVENT_STRUCT.unpack(raw_event(**ev)[:EVENT_SIZE])
    states = bytes(s for s, _ in visited).ljust(LIFE_VISITS, b"\0")
    times = [t for _, t in visited] + [0] * (LIFE_VISITS - len(visited))
    n = len(visited) if visits is None else visits
    return LIFE_STRUCT.pack(*event, birth_ns, *times, states, n, 0) + b"\0\0\0\0"


def test_decode_fields():
    ev = decode(raw_event())
    assert ev.pid == 42 and ev.sport == 40000 and ev.dport == 443
    assert ev.local_addr == "10.0.0.1" and ev.remote_addr == "10.0.0.2"
    assert ev.command == "curl"
    assert ev.delta_known and ev.owner_known
    assert ev.skaddr == 0xFFFF888012345678


def test_flags_unset():
    ev = decode(raw_event(flags=0))
    assert not ev.delta_known and not ev.owner_known


def test_decode_many_keeps_order():
    evs = list(decode_many([raw_event(pid=i) for i in range(5)]))
    assert [e.pid for e in evs] == list(range(5))


def test_ipv6_and_mapped_addresses():
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:192.0.2.7")
    assert format_addr(socket.AF_INET6, v6) == "2001:db8::1"
    assert format_addr(socket.AF_INET6, mapped) == "192.0.2.7"


def test_comm_with_garbage_after_nul():
    ev = decode(raw_event(comm=b"nginx\0xx".ljust(16, b"\0")))
    assert ev.command == "nginx"


def test_size():
    assert EVENT_SIZE == 104


def test_default_buffer_pages_share_64_mib_within_bounds():
    import mmap

    from tcptrace.kernel.loader import MAX_BUFFER_PAGES, MIN_BUFFER_PAGES, default_buffer_pages

    for cpus in (1, 2, 3, 16, 64, 1024):
        pages = default_buffer_pages(cpus)
        assert pages & (pages - 1) == 0
        assert MIN_BUFFER_PAGES <= pages <= MAX_BUFFER_PAGES
        if pages > MIN_BUFFER_PAGES:
            assert pages * cpus * mmap.PAGESIZE <= 64 << 20
    assert default_buffer_pages(2) == MAX_BUFFER_PAGES
    assert default_buffer_pages(1024) == MIN_BUFFER_PAGES


def test_decode_life_record():
    raw = raw_life(
        1000,
        [(S.SYN_SENT, 10), (S.ESTABLISHED, 500), (S.CLOSE_WAIT, 30), (S.LAST_ACK, 7)],
        ts_ns=1547,
        delta_ns=7,
        oldstate=S.LAST_ACK,
        newstate=S.CLOSE,
    )
    life = decode_life(raw)
    # the closing transition, as any event
    assert (life.event.ts_ns, life.event.oldstate, life.event.newstate) == (1547, 9, 7)
    assert life.event.pid == 42 and life.event.command == "curl" and life.event.sport == 40000
    assert life.born and life.birth_ns == 1000
    assert life.visited() == [(2, 10), (1, 500), (8, 30), (9, 7)]


def test_life_record_of_a_socket_seen_mid_life():
    life = decode_life(raw_life(0, [(S.ESTABLISHED, 0), (S.FIN_WAIT1, 40), (S.FIN_WAIT2, 9)]))
    assert not life.born
    # the state it was in when first seen: for an unknown time
    assert life.visited() == [(1, None), (4, 40), (5, 9)]


def test_life_record_past_its_slots():
    visited = [(S.ESTABLISHED, i + 1) for i in range(LIFE_VISITS)]
    life = decode_life(raw_life(5, visited, visits=LIFE_VISITS + 2))
    # the states recorded; the last slot holds the time of the rest
    assert life.visits == LIFE_VISITS + 2 and len(life.visited()) == LIFE_VISITS


def test_raw_address_is_format_addrs_inverse_in_the_kernels_16_bytes() -> None:
    assert raw_address(socket.AF_INET, "10.0.0.1") == bytes([10, 0, 0, 1]) + bytes(12)
    mapped = raw_address(socket.AF_INET6, "10.0.0.1")
    assert mapped == socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.1")
    for family, text in ((socket.AF_INET, "192.0.2.7"), (socket.AF_INET6, "2001:db8::1")):
        assert format_addr(family, raw_address(family, text)) == text
