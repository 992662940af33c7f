"""Parsing perf ring contents: synthetic records as the kernel lays them out."""

from __future__ import annotations

import mmap
import os
import struct
import tempfile

import pytest

from tcptrace import perfbuf
from tcptrace.events import EVENT_SIZE, EVENT_STRUCT, Event, decode

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
        ts, 5, 0xFFFF0001, pid, 3, b"\x7f\0\0\1", b"\x7f\0\0\1", 1, 2, 2, 1, 4, b"x"
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


def test_bounded_reads_take_whole_records_and_leave_the_rest():
    ring = FileRing(data_pages=4)
    try:
        rsize = perfbuf.record_size(EVENT_SIZE)
        for pid in range(10):
            ring.kernel_write(sample_record(event(pid)))
        ring.kernel_write(lost_record(7))  # shifts the records off the rsize grid
        for pid in range(10, 30):
            ring.kernel_write(sample_record(event(pid)))
        limit = 4 * rsize + rsize // 2  # ends mid-record
        seen: list[int] = []
        lost = 0
        truncated = True
        reads = 0
        while truncated:
            parsed, truncated = perfbuf.read_bounded(ring, EVENT_SIZE, limit)
            assert parsed.consumed <= limit
            seen += [e.pid for e in unpack_all(parsed)]
            lost += parsed.lost
            reads += 1
        assert seen == list(range(30)) and lost == 7
        assert reads > 30 // 4
        assert ring.pending() == 0
    finally:
        ring.close()


def test_a_bounded_read_of_a_complete_chunk_releases_it_all():
    ring = FileRing(data_pages=1)
    try:
        ring.kernel_write(sample_record(event(1)))
        ring.kernel_write(HEADER.pack(perfbuf.PERF_RECORD_LOST, 0, 0) + b"\0" * 16)  # corrupt
        parsed, truncated = perfbuf.read_bounded(ring, EVENT_SIZE, 1 << 20)
        assert not truncated and [e.pid for e in unpack_all(parsed)] == [1]
        assert ring.pending() == 0  # never stuck on the corrupt record
    finally:
        ring.close()
