"""The map scan in user space: the iterator's rules on plain bytes."""

from __future__ import annotations

import socket
import sys

from tcptrace.kernel.events import F_DELTA_KNOWN, F_NETNS_KNOWN, F_OWNER_KNOWN, F_STUCK
from tcptrace.kernel.mapscan import (
    AGE,
    SCAN_EVERY,
    SCAN_NEW,
    SCAN_STUCK,
    SK_INFO,
    SK_INFO_OFFSETS,
    UserScan,
    _columns,
)
from tcptrace.states import TcpState

S = 1_000_000_000
STATE_AT = SK_INFO_OFFSETS["state"]
CW = int(TcpState.CLOSE_WAIT)
EST = int(TcpState.ESTABLISHED)


def entry(ts: int, state: int, *, sport: int = 80, pid: int = 42, netns: int = 0) -> bytes:
    saddr = socket.inet_aton("10.0.0.1").ljust(16, b"\0")
    daddr = socket.inet_aton("10.0.0.2").ljust(16, b"\0")
    values = (ts, 7, pid, F_OWNER_KNOWN, b"server", state, netns, 0, saddr, daddr, sport,
              5000, socket.AF_INET, 0)  # fmt: skip
    return SK_INFO.pack(*values) + bytes(8)  # bcc's value may be longer: ignored


def walk(scan: UserScan, entries: list[tuple[int, bytes]], now: int, which: int):
    """The scan of these (socket address, value) entries, laid out as a batch read."""
    size = len(entries[0][1])
    raw = b"".join(value for _sk, value in entries)
    return scan.scan_values([sk for sk, _value in entries], raw, size, now, which)


def test_counts_oldest_and_stuck_per_state():
    scan = UserScan({CW: 2 * S})
    now = 100 * S
    entries = [
        (1, entry(now - 5 * S, CW)),
        (2, entry(now - 1 * S, CW)),
        (3, entry(now - 9 * S, EST)),
    ]
    result = walk(scan, entries, now, SCAN_NEW)
    assert result.count == {CW: 2, EST: 1}
    assert result.oldest == {CW: now - 5 * S, EST: now - 9 * S}
    assert result.stuck == {CW: 1}  # ESTABLISHED has no threshold
    (record,) = result.records
    assert record.skaddr == 1 and record.oldstate == record.newstate == CW
    assert record.delta_ns == 5 * S and record.ts_ns == now
    assert record.flags == F_STUCK | F_DELTA_KNOWN | F_OWNER_KNOWN
    assert (record.sport, record.dport, record.family) == (80, 5000, socket.AF_INET)
    assert record.comm.rstrip(b"\0") == b"server" and record.pid == 42


def test_a_socket_is_reported_once_per_stay_in_a_state():
    scan = UserScan({CW: 2 * S})
    first = [(1, entry(10 * S, CW))]
    assert len(walk(scan, first, 13 * S, SCAN_NEW).records) == 1
    assert walk(scan, first, 14 * S, SCAN_NEW).records == []
    # the exit list names every socket past its threshold, reported or not
    assert len(walk(scan, first, 15 * S, SCAN_STUCK).records) == 1
    # it left and came back: another stay, another report
    again = [(1, entry(20 * S, CW))]
    assert walk(scan, again, 21 * S, SCAN_NEW).records == []
    assert len(walk(scan, again, 23 * S, SCAN_NEW).records) == 1


def test_every_lists_all_sockets_and_keeps_the_marks():
    scan = UserScan({CW: 2 * S})
    entries = [(1, entry(10 * S, CW)), (2, entry(12 * S, EST, netns=4026531840))]
    assert len(walk(scan, entries, 13 * S, SCAN_NEW).records) == 1
    every = walk(scan, entries, 13 * S, SCAN_EVERY).records
    assert [r.skaddr for r in every] == [1, 2]
    assert every[1].flags & F_NETNS_KNOWN and every[1].netns == 4026531840
    assert walk(scan, entries, 14 * S, SCAN_NEW).records == []  # still reported


def test_young_and_unknown_entries_are_left_out():
    scan = UserScan({CW: S})
    now = 10 * S
    entries = [(1, entry(now + 1, CW)), (2, entry(now - 5 * S, 99))]
    result = walk(scan, entries, now, SCAN_EVERY)
    assert result.count == {} and result.records == []


def test_the_walk_in_c_finds_what_the_walk_entry_by_entry_finds():
    """The columns' path (C loops) against the per-entry path, on the same entries: every
    mode, several thresholds, reports kept from one scan to the next."""
    import random

    rng = random.Random(7)
    now = 1000 * S
    states = [CW, EST, int(TcpState.SYN_SENT), int(TcpState.LAST_ACK)]
    entries = [
        (0x1000 + i * 64, entry(now - rng.randrange(0, 20 * S), rng.choice(states), sport=i))
        for i in range(500)
    ]
    size = len(entries[0][1])
    raw = b"".join(value for _sk, value in entries)
    addresses = [sk for sk, _value in entries]
    limits = {CW: 5 * S, int(TcpState.SYN_SENT): 12 * S}
    assert _columns(raw, size, STATE_AT) is not None  # the C path is the one taken
    in_c, each = UserScan(limits), UserScan(limits)
    for step, which in enumerate((SCAN_NEW, SCAN_NEW, SCAN_STUCK, SCAN_EVERY, SCAN_NEW)):
        at = now + step * S
        got = in_c.scan_values(addresses, raw, size, at, which)
        picked, oldest, count, stuck = each._visit_each(addresses, raw, size, STATE_AT, at, which)
        assert (got.oldest, got.count, got.stuck) == (oldest, count, stuck)
        assert [r.skaddr for r in got.records] == [addresses[i] for i in picked]
        assert in_c.reported == each.reported


def test_the_ages_map_walk_reports_what_the_sk_info_walk_does():
    """Where the kernel keeps the ages map (sk_age: time and state alone), the walk over
    it finds the same, and takes each reported socket's details from the socket map;
    one gone since (details None) is counted but not reported."""
    now = 100 * S
    entries = [
        (1, entry(now - 5 * S, CW, sport=1)),
        (2, entry(now - 1 * S, CW, sport=2)),
        (3, entry(now - 9 * S, EST, sport=3)),
        (4, entry(now - 7 * S, CW, sport=4)),
    ]
    ts_at, state_at = SK_INFO_OFFSETS["ts"], SK_INFO_OFFSETS["state"]
    ages = b"".join(
        AGE.pack(int.from_bytes(v[ts_at : ts_at + 8], sys.byteorder),
                 int.from_bytes(v[state_at : state_at + 4], sys.byteorder), 0)
        for _sk, v in entries
    )  # fmt: skip
    infos = {sk: value for sk, value in entries if sk != 4}  # 4 closed since the ages read
    by_ages = UserScan({CW: 2 * S}).scan_ages([1, 2, 3, 4], ages, now, SCAN_NEW, infos.get)
    by_info = walk(UserScan({CW: 2 * S}), entries, now, SCAN_NEW)
    assert (by_ages.count, by_ages.oldest, by_ages.stuck) == (
        by_info.count,
        by_info.oldest,
        by_info.stuck,
    )
    assert [r.skaddr for r in by_info.records] == [1, 4]
    (record,) = by_ages.records
    assert record == by_info.records[0]
