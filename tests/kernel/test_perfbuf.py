"""Parsing perf ring contents: synthetic records as the kernel lays them out."""

from __future__ import annotations

import mmap
import os
import struct
import tempfile

import pytest

from tcptrace.kernel import perfbuf
from tcptrace.kernel.events import EVENT_SIZE, EVENT_STRUCT, Event, decode

HEADER = struct.Struct("=IHH")


def sample_record(payload: bytes) -> bytes:
    """PERF_RECORD_SAMPLE with PERF_SAMPLE_RAW, padded to 8 bytes as the kernel does."""
    size = perfbuf.record_size(len(payload))
    raw_size = size - HEADER.size - 4  # the kernel counts the padding in raw_size
    body = struct.pack("=I", raw_size) + payload
    body += b"\0" * (size - HEADER.size - len(body))
    return HEADER.pack(perfbuf.PERF_RECORD_SAMPLE, 0, size) + body


def lost_record(count: int) -> bytes:
    return HEADER.pack(perfbuf.PERF_RECORD_LOST, 0, 24) + struct.pack("=QQ", 7, count)


def event(pid: int, ts: int = 1000) -> bytes:
    return EVENT_STRUCT.pack(
        ts, 5, 0xFFFF0001, 0, pid, 3, 0, 0, b"\x7f\0\0\1", b"\x7f\0\0\1", 1, 2, 2, 1, 4, b"x"
    )


def unpack_all(parsed: perfbuf.Parsed) -> list[Event]:
    rec = perfbuf.record_struct(EVENT_STRUCT)
    return [Event._make(t) for run in parsed.runs for t in rec.iter_unpack(run)]


def test_record_size_is_8_byte_aligned():
    assert perfbuf.record_size(EVENT_SIZE) % 8 == 0
    assert perfbuf.record_size(EVENT_SIZE) >= HEADER.size + 4 + EVENT_SIZE
    assert perfbuf.record_size(4) == 16


def test_fast_path_unpacks_every_sample_in_order():
    chunk = b"".join(sample_record(event(pid)) for pid in range(100))
    parsed = perfbuf.parse(chunk, EVENT_SIZE)
    assert parsed.samples == 100 and parsed.lost == 0 and len(parsed.runs) == 1
    evs = unpack_all(parsed)
    assert [e.pid for e in evs] == list(range(100))
    assert evs[3] == decode(event(3))


def test_lost_records_between_samples_are_counted_and_split_runs():
    chunk = (
        sample_record(event(1))
        + sample_record(event(2))
        + lost_record(40)
        + sample_record(event(3))
        + lost_record(2)
    )
    parsed = perfbuf.parse(chunk, EVENT_SIZE)
    assert parsed.lost == 42
    assert parsed.samples == 3
    assert len(parsed.runs) == 2
    assert [e.pid for e in unpack_all(parsed)] == [1, 2, 3]


def test_unknown_records_and_other_sample_sizes_are_skipped():
    chunk = HEADER.pack(99, 0, 16) + b"\0" * 8 + sample_record(b"short") + sample_record(event(5))
    parsed = perfbuf.parse(chunk, EVENT_SIZE)
    assert parsed.skipped == 2
    assert [e.pid for e in unpack_all(parsed)] == [5]


def test_a_corrupt_size_stops_the_walk_instead_of_looping():
    chunk = sample_record(event(1)) + HEADER.pack(perfbuf.PERF_RECORD_LOST, 0, 0) + b"\0" * 16
    parsed = perfbuf.parse(chunk, EVENT_SIZE)
    assert [e.pid for e in unpack_all(parsed)] == [1]


def test_empty_chunk():
    assert perfbuf.parse(b"", EVENT_SIZE).samples == 0


def test_cut_before_finds_the_first_sample_after_the_frontier():
    """The binary search over stamps read in place: before every sample, between equal
    stamps, after the last, and on the walk of a chunk that is not all samples."""
    stamps = [10, 20, 20, 20, 30, 40]
    rsize = perfbuf.record_size(EVENT_SIZE)
    chunk = b"".join(sample_record(event(pid, ts)) for pid, ts in enumerate(stamps))
    expected = {5: (0, 10), 10: (rsize, 20), 19: (rsize, 20), 20: (4 * rsize, 30)}
    expected.update({39: (5 * rsize, 40), 40: (len(chunk), None), 99: (len(chunk), None)})
    for frontier, cut in expected.items():
        assert perfbuf.cut_before(chunk, EVENT_SIZE, frontier) == cut, frontier
    assert perfbuf.cut_before(b"", EVENT_SIZE, 0) == (0, None)
    walked = lost_record(1) + chunk  # the general path: not a whole number of samples
    assert perfbuf.cut_before(walked, EVENT_SIZE, 20) == (24 + 4 * rsize, 30)


def test_iter_samples_gives_the_raw_events():
    chunk = b"".join(sample_record(event(pid)) for pid in (7, 8))
    raws = list(perfbuf.iter_samples(chunk, EVENT_SIZE))
    assert [decode(r).pid for r in raws] == [7, 8]


class FileRing(perfbuf.Ring):
    """A Ring over a plain file laid out like a perf mmap: control page, then data."""

    def __init__(self, data_pages: int) -> None:
        fd, self.path = tempfile.mkstemp()
        os.ftruncate(fd, (1 + data_pages) * mmap.PAGESIZE)
        super().__init__(fd, cpu=0, pages=data_pages)

    def kernel_write(self, record: bytes) -> None:
        """Append a record at the head, wrapping around the data area, as the kernel does."""
        head = perfbuf.U64.unpack_from(self.map, perfbuf.DATA_HEAD_OFFSET)[0]
        for i, byte in enumerate(record):
            self.map[self.data_offset + (head + i) % self.data_size] = byte
        perfbuf.U64.pack_into(self.map, perfbuf.DATA_HEAD_OFFSET, head + len(record))

    def close(self) -> None:
        super().close()
        os.unlink(self.path)


def read_all(ring: perfbuf.Ring) -> bytes:
    """Everything the kernel wrote since the tail, copied out and released."""
    chunk = ring.peek()
    ring.release(len(chunk))
    return chunk


def test_ring_read_wraps_around_and_advances_the_tail():
    ring = FileRing(data_pages=1)
    try:
        per_page = mmap.PAGESIZE // perfbuf.record_size(EVENT_SIZE)
        pid = 0
        seen: list[int] = []
        # several laps around the ring, reading a few records at a time
        for batch in (per_page - 3, 5, per_page, 1, per_page - 1):
            for _ in range(batch):
                ring.kernel_write(sample_record(event(pid)))
                pid += 1
            chunk = read_all(ring)
            assert perfbuf.U64.unpack_from(ring.map, perfbuf.DATA_TAIL_OFFSET)[0] == ring.tail
            seen += [e.pid for e in unpack_all(perfbuf.parse(chunk, EVENT_SIZE))]
            assert read_all(ring) == b""
        assert seen == list(range(pid))
    finally:
        ring.close()


def test_ring_read_across_the_end_with_a_lost_record():
    ring = FileRing(data_pages=1)
    try:
        rsize = perfbuf.record_size(EVENT_SIZE)
        # move the head and tail close to the end of the data area
        filler = mmap.PAGESIZE // rsize - 1
        for i in range(filler):
            ring.kernel_write(sample_record(event(i)))
        read_all(ring)
        ring.kernel_write(lost_record(9))
        ring.kernel_write(sample_record(event(500)))
        ring.kernel_write(sample_record(event(501)))
        parsed = perfbuf.parse(read_all(ring), EVENT_SIZE)
        assert parsed.lost == 9
        assert [e.pid for e in unpack_all(parsed)] == [500, 501]
    finally:
        ring.close()


def test_online_cpus_parses_ranges(tmp_path):
    path = tmp_path / "online"
    path.write_text("0-3,6,8-9\n")
    assert perfbuf.online_cpus(str(path)) == [0, 1, 2, 3, 6, 8, 9]


def test_pages_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        perfbuf.PerfReader(EVENT_STRUCT, pages=3, cpus=[])


def fake_reader(*rings: perfbuf.Ring) -> perfbuf.PerfReader:
    """A PerfReader over fake rings (no perf events)."""
    reader = perfbuf.PerfReader(EVENT_STRUCT, pages=1, cpus=[])
    reader.rings = list(rings)
    return reader


def pids(reader: perfbuf.PerfReader, runs: list[bytes]) -> list[int]:
    return [Event._make(t).pid for run in runs for t in reader.record.iter_unpack(run)]


def test_bounded_reads_take_whole_records_and_leave_the_rest(monkeypatch):
    monkeypatch.setattr(perfbuf, "READ_RECORDS", 4)
    ring = FileRing(data_pages=4)
    try:
        reader = fake_reader(ring)
        for pid in range(10):
            ring.kernel_write(sample_record(event(pid)))
        ring.kernel_write(lost_record(7))  # shifts the records off the rsize grid
        for pid in range(10, 30):
            ring.kernel_write(sample_record(event(pid)))
        seen: list[int] = []
        reads = 0
        reader.more = True
        while reader.more:
            seen += pids(reader, reader.read_runs())
            reads += 1
        assert seen == list(range(30)) and reader.lost == 7
        assert reads > 30 // 4
        assert ring.pending() == 0
    finally:
        ring.close()


def test_a_bounded_read_of_a_complete_chunk_releases_it_all():
    ring = FileRing(data_pages=1)
    try:
        reader = fake_reader(ring)
        ring.kernel_write(sample_record(event(1)))
        ring.kernel_write(HEADER.pack(perfbuf.PERF_RECORD_LOST, 0, 0) + b"\0" * 16)  # corrupt
        runs = reader.read_runs()
        assert not reader.more and pids(reader, runs) == [1]
        assert ring.pending() == 0  # never stuck on the corrupt record
    finally:
        ring.close()


def stamped(pid: int, ts: int) -> bytes:
    return sample_record(event(pid, ts))


def test_a_ring_read_to_its_bound_holds_back_the_later_samples_of_the_others(monkeypatch):
    """CPU 0 lags (its read stops at the bound, at t=40); CPU 1 was read to its end. What
    CPU 1 stamped after t=40 waits: CPU 0 may still deliver t=41..60 before it."""
    monkeypatch.setattr(perfbuf, "READ_RECORDS", 4)
    lagging, drained = FileRing(data_pages=1), FileRing(data_pages=1)
    try:
        reader = fake_reader(lagging, drained)
        for i, ts in enumerate((10, 20, 30, 40, 50, 60)):
            lagging.kernel_write(stamped(i, ts))
        for i, ts in enumerate((15, 35, 45, 55)):
            drained.kernel_write(stamped(100 + i, ts))
        first = pids(reader, reader.read_runs(hold_ns=0))
        assert sorted(first) == [0, 1, 2, 3, 100, 101]
        assert reader.more  # the lagging ring can go on at once
        second = pids(reader, reader.read_runs(hold_ns=0))
        assert sorted(second) == [4, 5, 102, 103]
        assert lagging.pending() == drained.pending() == 0
    finally:
        lagging.close()
        drained.close()


def test_samples_stamped_just_before_the_read_wait_for_the_slack(monkeypatch):
    """A sample stamped within hold_ns of the read may still have a twin on another
    CPU that is stamped but not yet written: it stays in its ring, and the reader
    knows when it may go."""
    import time

    ring = FileRing(data_pages=1)
    try:
        reader = fake_reader(ring)
        now = time.monotonic_ns()
        hold = 10_000_000_000  # 10 s: the recent sample is surely held
        ring.kernel_write(stamped(1, now - 2 * hold))
        ring.kernel_write(stamped(2, now))
        assert pids(reader, reader.read_runs(hold_ns=hold)) == [1]
        assert not reader.more and reader.release_at_ns == now + hold
        assert ring.pending() > 0
        # once nothing more can come (detached), everything goes
        assert pids(reader, reader.read_runs(hold_ns=None)) == [2]
        assert reader.release_at_ns is None and ring.pending() == 0
    finally:
        ring.close()


def test_held_samples_after_a_lost_record_are_read_again_and_counted_once(monkeypatch):
    ring = FileRing(data_pages=1)
    try:
        reader = fake_reader(ring)
        ring.kernel_write(stamped(1, 10))
        ring.kernel_write(lost_record(3))
        ring.kernel_write(stamped(2, 30))
        # frontier at 20: sample 2 stays; the lost record before it is counted now
        monkeypatch.setattr(perfbuf.time, "monotonic_ns", lambda: 25)
        assert pids(reader, reader.read_runs(hold_ns=5)) == [1]
        assert reader.lost == 3
        monkeypatch.setattr(perfbuf.time, "monotonic_ns", lambda: 100)
        assert pids(reader, reader.read_runs(hold_ns=5)) == [2]
        assert reader.lost == 3 and ring.pending() == 0
    finally:
        ring.close()


def test_held_samples_are_read_again_with_a_batchs_worth_of_company():
    """At a high rate a few samples are held at every read: reading again as soon as
    they may go would make batches of a few; the reader waits until MIN_READ_INTERVAL_NS
    after its last read (never past the caller's timeout)."""
    import time

    reader = fake_reader()
    slept: list[float] = []

    class Epoll:
        def poll(self, timeout: float) -> None:
            slept.append(timeout)

    reader.epoll.close()
    reader.epoll = Epoll()  # type: ignore[assignment]
    reader.read_runs(hold_ns=0)  # the last read: now
    reader.release_at_ns = time.monotonic_ns() + perfbuf.NS_PER_MS  # may go in 1 ms
    reader.wait(50)
    interval_s = perfbuf.MIN_READ_INTERVAL_NS / 1e9
    assert interval_s - 0.002 <= slept[-1] <= interval_s
    reader.wait(5)  # a shorter timeout wins
    assert slept[-1] == 0.005
    reader.read_ns -= 2 * perfbuf.MIN_READ_INTERVAL_NS  # read long ago: at release time
    reader.wait(50)
    assert slept[-1] <= 0.001
