"""Capture files (kernel/capfile.py, docs/capture-format.md): what is written reads back
whole, and whatever is wrong with a file is one CaptureError line naming it."""

from __future__ import annotations

import errno
import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path
from typing import Any

import pytest

from tcptrace.errors import TcptraceError
from tcptrace.kernel import capfile, events
from tcptrace.kernel.capfile import (
    END,
    EVENTS,
    INFO,
    LIVES,
    CaptureError,
    CaptureReader,
    CaptureWriter,
    RotatingWriter,
    open_captures,
    rotation_path,
)

from .test_layout import c_fields, c_size

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "capture-format.md"
META = {"tcptrace_version": "0.1.0", "hostname": "test", "command": ["tcptrace", "--write"]}
HEADER_PREFIX = 14  # magic, version, JSON length


def raw_events(first: int, n: int) -> bytes:
    """n kernel records numbered by ts_ns from `first`, as the perf buffer hands them."""
    return b"".join(
        events.EVENT_STRUCT.pack(
            ts, 1000 + ts, 0xFFFF0000 + ts, 7, 4242, events.F_DELTA_KNOWN, 4026531840, 0,
            bytes([127, 0, 0, 1]).ljust(16, b"\0"), bytes([10, 0, 0, 2]).ljust(16, b"\0"),
            40000 + ts % 1000, 443, events.AF_INET, 1, 4, b"curl".ljust(16, b"\0"),
        )
        for ts in range(first, first + n)
    )  # fmt: skip


def raw_lives(first: int, n: int) -> bytes:
    one = []
    for ts in range(first, first + n):
        ev = events.EVENT_STRUCT.unpack(raw_events(ts, 1))
        visits = tuple(range(100, 100 + events.LIFE_VISITS))
        one.append(events.LIFE_STRUCT.pack(*ev, ts + 5000, *visits, bytes(range(1, 9)), 3, 0))
    return b"".join(one)


def ts_of(block: bytes) -> list[int]:
    return [fields[0] for fields in events.EVENT_STRUCT.iter_unpack(block)]


def read_all(data: bytes, name: str = "cap.bin") -> list[tuple[Any, Any]]:
    return list(CaptureReader(io.BytesIO(data), name).records())


def read_until_error(data: bytes, name: str = "cap.bin") -> tuple[list, CaptureError | None]:
    """The records a reader yields, and the error it raises after them (or None)."""
    got: list = []
    try:
        for record in CaptureReader(io.BytesIO(data), name).records():
            got.append(record)
    except CaptureError as exc:
        return got, exc
    return got, None


def one_line_naming(exc: BaseException, name: str) -> str:
    text = str(exc)
    assert "\n" not in text
    assert text.startswith(f"{name}: ")
    return text


def small_capture() -> tuple[bytes, list[tuple[Any, Any]], list[int]]:
    """A capture of every record type, the records, and where each record ends."""
    out = io.BytesIO()
    writer = CaptureWriter(out, META)
    records = [
        (EVENTS, raw_events(0, 2)),
        (LIVES, raw_lives(2, 1)),
        (INFO, {"kind": "owner", "skaddr": 1, "pid": 4242, "comm": "curl"}),
        (EVENTS, raw_events(3, 1)),
        (END, {"seen": 4, "lost": 0}),
    ]
    ends = [writer.bytes_written]
    for rtype, payload in records:
        getattr(writer, rtype.name.lower())(payload)
        ends.append(writer.bytes_written)
    return out.getvalue(), records, ends


# --- round trip ---------------------------------------------------------------------


def test_round_trip_of_every_record_type() -> None:
    data, records, _ends = small_capture()
    reader = CaptureReader(io.BytesIO(data), "cap.bin")
    assert {k: reader.meta[k] for k in META} == META
    assert reader.version == capfile.VERSION == 1
    got = list(reader.records())
    assert got == records
    assert [type(p) for _t, p in got] == [bytes, bytes, dict, bytes, dict]
    assert reader.records_read == len(records)
    assert reader.bytes_read == len(data)
    decoded = list(events.decode_many([got[0][1][: events.EVENT_SIZE]]))
    assert decoded[0].command == "curl" and decoded[0].local_addr == "127.0.0.1"
    life = events.decode_life(got[1][1])
    assert (life.event.ts_ns, life.birth_ns, life.visits) == (2, 5002, 3)


def test_an_event_block_is_the_kernels_bytes_under_one_record_header() -> None:
    out = io.BytesIO()
    writer = CaptureWriter(out, META)
    header_size = writer.bytes_written
    block = raw_events(0, 2048)  # one read of a ring, as perfbuf gives it
    writer.events(block)
    assert writer.records_written == 1
    assert writer.bytes_written == len(out.getvalue()) == header_size + 12 + len(block)
    assert out.getvalue().endswith(block)  # native layout, not converted
    assert read_all(out.getvalue()) == [(EVENTS, block)]


def test_empty_blocks_write_nothing() -> None:
    out = io.BytesIO()
    writer = CaptureWriter(out, META)
    before = writer.bytes_written
    writer.events(b"")
    writer.lives(b"")
    assert writer.bytes_written == before and writer.records_written == 0
    assert read_all(out.getvalue()) == []


def test_memoryview_and_bytearray_blocks() -> None:
    out = io.BytesIO()
    writer = CaptureWriter(out, META)
    writer.events(memoryview(raw_events(0, 3)))
    writer.events(bytearray(raw_events(3, 2)))
    assert [ts_of(p) for _t, p in read_all(out.getvalue())] == [[0, 1, 2], [3, 4]]


def test_a_block_over_the_payload_bound_is_split_at_record_boundaries(monkeypatch) -> None:
    monkeypatch.setattr(capfile, "MAX_PAYLOAD", 3 * events.EVENT_SIZE + 5)
    out = io.BytesIO()
    CaptureWriter(out, META).events(raw_events(0, 10))
    assert [ts_of(p) for _t, p in read_all(out.getvalue())] == [
        [0, 1, 2], [3, 4, 5], [6, 7, 8], [9],
    ]  # fmt: skip


def test_writer_refuses_what_a_reader_could_not_read() -> None:
    out = io.BytesIO()
    writer = CaptureWriter(out, META)
    size = len(out.getvalue())
    with pytest.raises(ValueError, match="whole number"):
        writer.events(raw_events(0, 2)[:-1])
    with pytest.raises(ValueError, match="whole number"):
        writer.lives(raw_events(0, 1))
    with pytest.raises(ValueError, match='"kind"'):
        writer.info({"pid": 1})
    with pytest.raises(TypeError):
        writer.info({"kind": "owner", "raw": b"bytes are not JSON"})
    with pytest.raises(ValueError):
        writer.end({"nan": float("nan")})
    assert len(out.getvalue()) == size  # nothing half-written
    with pytest.raises(ValueError, match="layout"):
        CaptureWriter(io.BytesIO(), {"layout": {}})


def test_host_meta_says_what_wrote_it() -> None:
    meta = capfile.host_meta(["tcptrace", "--write", "x"], "0.1.0")
    assert meta["tcptrace_version"] == "0.1.0"
    assert meta["kernel_release"] == os.uname().release
    assert meta["command"] == ["tcptrace", "--write", "x"]
    # an event's wall time is ts_ns + the offset: now, by both clocks
    wall = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + meta["monotonic_to_wall_ns"]
    assert abs(wall - time.time_ns()) < 50_000_000
    out = io.BytesIO()
    CaptureWriter(out, meta)
    assert CaptureReader(io.BytesIO(out.getvalue()), "x").meta["hostname"] == meta["hostname"]


def test_the_header_describes_the_layout_of_bpf_tcptrace_h() -> None:
    """As tests/kernel/test_layout.py holds events.py to the C header, this holds the
    capture's self-description to it: a reader elsewhere decodes by it."""
    out = io.BytesIO()
    CaptureWriter(out, META)
    layout = CaptureReader(io.BytesIO(out.getvalue()), "cap.bin").meta["layout"]
    assert layout["byte_order"] == sys.byteorder
    event, life = c_fields("tcptrace_event"), c_fields("tcptrace_life")
    assert [tuple(f) for f in layout["event"]["fields"]] == event
    assert layout["event"]["size"] == c_size(event) == events.EVENT_SIZE
    assert [tuple(f) for f in layout["life"]["fields"]] == life
    assert layout["life"]["size"] == c_size(life) == events.LIFE_SIZE


def test_the_documented_bytes() -> None:
    """docs/capture-format.md's offsets, on a real file."""
    data, _records, ends = small_capture()
    magic, version, length = struct.unpack_from("<8sHI", data)
    assert magic == b"\x89TCPTR\r\n" and version == 1
    crc = struct.unpack_from("<I", data, HEADER_PREFIX + length)[0]
    assert crc == zlib.crc32(data[: HEADER_PREFIX + length])
    assert ends[0] == HEADER_PREFIX + length + 4
    rtype, reserved, size, crc = struct.unpack_from("<HHII", data, ends[0])
    payload = data[ends[0] + 12 : ends[0] + 12 + size]
    assert (rtype, reserved, size) == (1, 0, 2 * 104)
    assert crc == zlib.crc32(data[ends[0] : ends[0] + 8] + payload)
    assert payload == raw_events(0, 2)
    assert "89 54 43 50 54 52 0D 0A" in DOC.read_text()


# --- truncation and damage ----------------------------------------------------------


def test_a_file_cut_at_every_byte_yields_the_whole_records_then_one_error_line() -> None:
    data, records, ends = small_capture()
    header_end = ends[0]
    for cut in range(len(data)):
        if cut < header_end:
            with pytest.raises(CaptureError) as info:
                CaptureReader(io.BytesIO(data[:cut]), "cap.bin")
            text = one_line_naming(info.value, "cap.bin")
            assert ("empty" if cut == 0 else "truncated in its header") in text, cut
            continue
        got, exc = read_until_error(data[:cut])
        whole = sum(1 for end in ends[1:] if end <= cut)
        assert got == records[:whole], cut
        if cut in ends:  # cut between two records: a whole, shorter capture
            assert exc is None, cut
            continue
        assert exc is not None, cut
        text = one_line_naming(exc, "cap.bin")
        assert "truncated" in text and f"{whole} whole record" in text, text
        assert f"({ends[whole]} bytes)" in text, text
    assert read_all(data) == records


def test_a_killed_writer_leaves_a_file_readable_to_its_last_whole_record(tmp_path) -> None:
    """A real writer process, SIGKILLed while it writes; then the same cut mid-record."""
    path = tmp_path / "cap.bin"
    script = (
        "import sys\n"
        "from tcptrace.kernel import capfile, events\n"
        "from tests.kernel.test_capfile import raw_events\n"
        "w = capfile.CaptureWriter(open(sys.argv[1], 'wb', buffering=0), {})\n"
        "blocks = [raw_events(0, n) for n in range(1, 400)]\n"
        "seq = 0\n"
        "while seq < 2_000_000:\n"
        "    for block in blocks:\n"
        "        w.events(block)\n"
        "        seq += len(block) // events.EVENT_SIZE\n"
        "    if seq < 100_000: print('writing', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
        time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    data = path.read_bytes()
    got, exc = read_until_error(data, str(path))
    sizes = [len(p) // events.EVENT_SIZE for _t, p in got]
    assert len(got) >= 399 and sizes[:399] == list(range(1, 400))
    if exc is not None:
        assert "truncated" in one_line_naming(exc, str(path))
    # and cut inside the record after the last whole one, as a kill mid-write leaves it
    whole = CaptureReader(io.BytesIO(data), "x")
    for _ in zip(range(300), whole.records()):
        pass
    cut = whole.bytes_read + 12 + 57 * events.EVENT_SIZE + 3
    got, exc = read_until_error(data[:cut], "cap.bin")
    assert len(got) == 300 and exc is not None
    assert "300 whole records" in one_line_naming(exc, "cap.bin")


def test_not_a_capture_is_one_line(tmp_path) -> None:
    cases = {
        "empty": (b"", "empty, not a tcptrace capture"),
        "garbage": (bytes(range(7, 256)) * 3, "not a tcptrace capture"),
        "text": (b"# Network services, Internet style\ntcpmux 1/tcp\n", "not a tcptrace capture"),
    }
    services = Path("/etc/services")
    if services.is_file():
        cases["/etc/services"] = (services.read_bytes(), "not a tcptrace capture")
    for name, (data, expected) in cases.items():
        with pytest.raises(CaptureError) as info:
            CaptureReader(io.BytesIO(data), name)
        assert expected in one_line_naming(info.value, name)
        assert isinstance(info.value, TcptraceError) and info.value.exit_code == 1


def test_etc_services_through_open_captures() -> None:
    if not Path("/etc/services").is_file():
        pytest.skip("no /etc/services here")
    with pytest.raises(CaptureError, match=r"^/etc/services: not a tcptrace capture"):
        open_captures(["/etc/services"])


def test_a_newer_version_is_named() -> None:
    data, _records, _ends = small_capture()
    newer = data[:8] + struct.pack("<H", 3) + b"whatever version 3 lays out after it"
    with pytest.raises(CaptureError) as info:
        CaptureReader(io.BytesIO(newer), "new.cap")
    assert str(info.value) == (
        "new.cap: written by a newer tcptrace: format version 3, this one reads 1"
    )
    zero = data[:8] + struct.pack("<H", 0) + data[10:]
    with pytest.raises(CaptureError, match="damaged capture header"):
        CaptureReader(io.BytesIO(zero), "zero.cap")


def _written_with_layout(monkeypatch, change) -> bytes:
    """A capture whose header describes another program's layout."""
    real = capfile.layout
    other = real()
    change(other)
    with monkeypatch.context() as patch:
        patch.setattr(capfile, "layout", lambda: other)
        out = io.BytesIO()
        writer = CaptureWriter(out, {"tcptrace_version": "9.0"})
    writer.events(raw_events(0, 1))
    writer.lives(raw_lives(1, 1))
    return out.getvalue()


def test_another_event_layout_is_refused_naming_the_difference(monkeypatch) -> None:
    def pid_u64(layout: dict) -> None:
        layout["event"]["fields"][4] = ["pid", "__u64", 1]

    def grown(layout: dict) -> None:
        layout["event"]["size"] = 112
        layout["event"]["fields"].append(["extra", "__u64", 1])

    for change, expected in (
        (pid_u64, "field ['pid', '__u64', 1] there, ['pid', '__u32', 1] here"),
        (grown, "112 bytes there, 104 here"),
    ):
        data = _written_with_layout(monkeypatch, change)
        with pytest.raises(CaptureError) as info:
            CaptureReader(io.BytesIO(data), "old.cap")
        text = one_line_naming(info.value, "old.cap")
        assert "event records are laid out otherwise" in text and "tcptrace 9.0" in text
        assert expected in text


def test_another_byte_order_is_refused(monkeypatch) -> None:
    other = "big" if sys.byteorder == "little" else "little"
    data = _written_with_layout(monkeypatch, lambda layout: layout.update(byte_order=other))
    with pytest.raises(CaptureError) as info:
        CaptureReader(io.BytesIO(data), "s390x.cap")
    assert f"written on a {other}-endian machine" in one_line_naming(info.value, "s390x.cap")


def test_another_life_layout_fails_at_the_first_life_record(monkeypatch) -> None:
    """A capture without --lifetime reads whatever its life layout; with, it stops there."""
    data = _written_with_layout(monkeypatch, lambda layout: layout["life"].update(size=200))
    got, exc = read_until_error(data, "l.cap")
    assert got == [(EVENTS, raw_events(0, 1))]
    assert "life records are laid out otherwise" in one_line_naming(exc, "l.cap")


def test_damage_is_found_after_the_whole_records_before_it() -> None:
    data, records, ends = small_capture()
    flipped = bytearray(data)
    flipped[ends[3] + 12 + 50] ^= 0x01  # inside the 4th record's payload (the 2nd events)
    got, exc = read_until_error(bytes(flipped))
    assert got == records[:3]
    text = one_line_naming(exc, "cap.bin")
    assert f"damaged record at byte {ends[3]} (checksum mismatch)" in text
    assert "3 whole records" in text
    # a crash's zero-filled tail is damage, not events at time 0
    got, exc = read_until_error(data + bytes(4096))
    assert got == records and "checksum mismatch" in str(exc)
    # a damaged header
    flipped = bytearray(data)
    flipped[HEADER_PREFIX + 5] ^= 0x20
    with pytest.raises(CaptureError, match=r"damaged capture header \(checksum mismatch\)"):
        CaptureReader(io.BytesIO(bytes(flipped)), "cap.bin")


def test_line_endings_converted_in_transfer() -> None:
    data, _records, _ends = small_capture()
    with pytest.raises(CaptureError, match="line endings"):
        CaptureReader(io.BytesIO(data.replace(b"\r\n", b"\n")), "ftp.cap")


def test_damaged_lengths_and_payloads(monkeypatch) -> None:
    header = small_capture()[0][: small_capture()[2][0]]
    huge = struct.pack("<HHII", 1, 0, 1 << 31, 0)
    _got, exc = read_until_error(header + huge)
    assert "a length of 2147483648 bytes" in one_line_naming(exc, "cap.bin")
    for record, expected in (
        (capfile._record(EVENTS, bytes(events.EVENT_SIZE + 1)), "105 bytes of 104-byte records"),
        (capfile._record(LIVES, bytes(100)), "100 bytes of 192-byte records"),
        (capfile._record(INFO, b"[1, 2]"), "its INFO record is not a JSON object"),
        (capfile._record(END, b"\xff{"), "its END record is not a JSON object"),
    ):
        got, exc = read_until_error(header + capfile._record(EVENTS, raw_events(0, 1)) + record)
        assert len(got) == 1
        assert expected in one_line_naming(exc, "cap.bin")


def test_unknown_record_types_are_skipped() -> None:
    """The format may grow record types within a version; older readers skip them."""
    out = io.BytesIO()
    writer = CaptureWriter(out, META)
    writer.events(raw_events(0, 1))
    out.write(capfile._record(99, b"a newer tcptrace's record"))
    writer.end({"seen": 1})
    reader = CaptureReader(io.BytesIO(out.getvalue()), "cap.bin")
    assert list(reader.records()) == [(EVENTS, raw_events(0, 1)), (END, {"seen": 1})]
    assert reader.records_read == 3 and reader.bytes_read == len(out.getvalue())


def test_unknown_header_keys_are_kept_and_ignored() -> None:
    out = io.BytesIO()
    CaptureWriter(out, {**META, "future": {"x": 1}})
    assert CaptureReader(io.BytesIO(out.getvalue()), "c").meta["future"] == {"x": 1}


# --- writing errors -------------------------------------------------------------------


class Disk(io.RawIOBase):
    """A raw file of `room` bytes that writes at most `chunk` a call, then ENOSPC."""

    def __init__(self, room: int, chunk: int = 1 << 30) -> None:
        self.data = bytearray()
        self.room, self.chunk = room, chunk

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        n = min(len(b), self.chunk, self.room - len(self.data))
        if n == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.data += bytes(b[:n])
        return n


def test_short_writes_are_completed() -> None:
    disk = Disk(1 << 20, chunk=5)
    writer = CaptureWriter(disk, META)  # type: ignore[arg-type]
    writer.events(raw_events(0, 3))
    writer.info({"kind": "netns", "inode": 4026531840, "name": "blue"})
    assert writer.bytes_written == len(disk.data)
    assert [t for t, _p in read_all(bytes(disk.data))] == [EVENTS, INFO]


def test_a_full_disk_raises_and_leaves_what_was_whole_readable() -> None:
    probe = io.BytesIO()
    CaptureWriter(probe, META).events(raw_events(0, 4))
    disk = Disk(len(probe.getvalue()) + 300)  # room for a record and part of the next
    writer = CaptureWriter(disk, META)  # type: ignore[arg-type]
    writer.events(raw_events(0, 4))
    with pytest.raises(OSError) as info:
        writer.events(raw_events(4, 4))
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(ValueError, match="earlier write failed"):
        writer.end({"seen": 8})  # it would follow a partial record
    got, exc = read_until_error(bytes(disk.data))
    assert got == [(EVENTS, raw_events(0, 4))]
    assert "truncated: 300 bytes" in one_line_naming(exc, "cap.bin")
    if Path("/dev/full").exists():
        with open("/dev/full", "wb", buffering=0) as full, pytest.raises(OSError) as info:
            CaptureWriter(full, META)
        assert info.value.errno == errno.ENOSPC


def test_a_closed_pipe_raises_epipe() -> None:
    read_fd, write_fd = os.pipe()
    with open(write_fd, "wb", buffering=0) as out:
        writer = CaptureWriter(out, META)
        os.close(read_fd)
        with pytest.raises(BrokenPipeError):
            writer.events(raw_events(0, 1))


def test_a_non_blocking_output_that_takes_nothing_raises() -> None:
    class Busy(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b) -> None:  # type: ignore[override]
            return None

    with pytest.raises(BlockingIOError):
        CaptureWriter(Busy(), META)  # type: ignore[arg-type]


# --- rotation -----------------------------------------------------------------------


def write_rotating(
    path: Path, count: int, max_bytes: int, file_count: int | None
) -> tuple[RotatingWriter, list]:
    """`count` records of 1 to 5 events numbered on, an INFO every 7th, then END."""
    writer = RotatingWriter(path, max_bytes, file_count, META)
    written: list = []
    seq = 0
    for i in range(count):
        if i % 7 == 3:
            record: tuple = (INFO, {"kind": "timewait_end", "seq": seq})
            writer.info(record[1])
        else:
            record = (EVENTS, raw_events(seq, 1 + i % 5))
            seq += 1 + i % 5
            writer.events(record[1])
        written.append(record)
    writer.end({"seen": seq})
    written.append((END, {"seen": seq}))
    writer.close()
    return writer, written


def record_size(record: tuple[Any, Any]) -> int:
    rtype, payload = record
    return 12 + len(payload if rtype in (EVENTS, LIVES) else capfile._json_bytes(payload))


def read_file(path: str) -> tuple[dict, list]:
    with open(path, "rb") as f:
        reader = CaptureReader(f, path)
        return reader.meta, list(reader.records())  # each alone: no error


def test_rotation_keeps_the_last_n_files_each_whole_no_record_split_or_twice(tmp_path) -> None:
    base = tmp_path / "cap.bin"
    max_bytes = 4000
    writer, written = write_rotating(base, 400, max_bytes=max_bytes, file_count=3)
    on_disk = sorted(str(p) for p in tmp_path.glob("cap.bin*"))
    assert len(on_disk) == 3
    assert writer.paths == on_disk  # zero-padded: name order is write order
    last = writer.paths[-1]
    index = int(last.rsplit(".", 1)[1])
    assert on_disk == [rotation_path(base, i) for i in (index - 2, index - 1, index)]
    kept = []
    metas = []
    for path in on_disk:
        meta, records = read_file(path)
        metas.append(meta)
        kept.extend(records)
        size = os.path.getsize(path)
        if path != last:  # it ended with the record that took it to max_bytes
            assert size - record_size(records[-1]) < max_bytes <= size
    # the kept files hold the newest records, each once, in order, up to END
    assert kept == written[len(written) - len(kept) :]
    assert kept[-1][0] == END and sum(1 for t, _p in kept if t == END) == 1
    assert [m["file"]["index"] for m in metas] == [index - 2, index - 1, index]
    assert len({m["file"]["run"] for m in metas}) == 1
    assert all(m["hostname"] == "test" for m in metas)


def test_rotation_without_a_count_keeps_every_record_once(tmp_path) -> None:
    writer, written = write_rotating(tmp_path / "cap.bin", 300, max_bytes=2500, file_count=None)
    assert len(writer.paths) > 10
    records = [r for path in writer.paths for r in read_file(path)[1]]
    assert records == written
    seqs = [ts for t, p in records if t == EVENTS for ts in ts_of(p)]
    assert seqs == list(range(len(seqs)))  # no gap, no duplicate at any switch
    assert writer.bytes_written == sum(os.path.getsize(p) for p in writer.paths)


def test_rotation_opens_the_next_file_only_for_a_record(tmp_path) -> None:
    """A record per file when each fills it; no header-only file after the last."""
    writer, written = write_rotating(tmp_path / "cap.bin", 5, max_bytes=1, file_count=None)
    assert len(writer.paths) == len(written) == len(list(tmp_path.iterdir()))
    assert [read_file(p)[1] for p in writer.paths] == [[r] for r in written]


def test_a_new_rotation_deletes_an_earlier_runs_files_only(tmp_path) -> None:
    base = tmp_path / "cap.bin"
    write_rotating(base, 100, max_bytes=1000, file_count=None)
    earlier = sorted(tmp_path.iterdir())
    assert len(earlier) > 5
    (tmp_path / "cap.bin.999999999").write_text("not a capture: kept\n")
    (tmp_path / "cap.bin.notes").write_text("kept\n")
    (tmp_path / "cap.bin.12").write_bytes(capfile.MAGIC)  # not our naming: kept
    _writer, written = write_rotating(base, 3, max_bytes=1 << 20, file_count=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cap.bin", "cap.bin.12", "cap.bin.999999999", "cap.bin.notes",
    ]  # fmt: skip
    assert read_file(str(base))[1] == written


def test_rotating_writer_arguments(tmp_path) -> None:
    with pytest.raises(ValueError):
        RotatingWriter(tmp_path / "a", 0, None, META)
    with pytest.raises(ValueError):
        RotatingWriter(tmp_path / "a", 100, 0, META)
    with pytest.raises(FileNotFoundError):
        RotatingWriter(tmp_path / "no" / "such" / "dir", 100, 3, META)
    assert rotation_path("cap.bin", 0) == "cap.bin"
    assert rotation_path("cap.bin", 12) == "cap.bin.000012"
    assert rotation_path("cap.bin", 1234567) == "cap.bin.1234567"
    with RotatingWriter(tmp_path / "b", None, None, META) as writer:
        writer.events(raw_events(0, 1))
        writer.flush()
        assert writer.bytes_written == os.path.getsize(tmp_path / "b")


# --- several files ------------------------------------------------------------------


def test_open_captures_reads_in_time_order_whatever_the_names_and_order(tmp_path) -> None:
    first, written_a = write_rotating(tmp_path / "a", 60, max_bytes=1500, file_count=None)
    out = io.BytesIO()
    later = CaptureWriter(out, META)  # a second run, started later
    later.events(raw_events(10_000, 2))
    later.end({"seen": 2})
    # names that sort against time: the later run first, the first run's files backwards
    (tmp_path / "0-later.cap").write_bytes(out.getvalue())
    for i, path in enumerate(first.paths):
        os.rename(path, tmp_path / f"{len(first.paths) - i:03d}.cap")
    names = sorted(str(p) for p in tmp_path.glob("*.cap"))
    assert len(first.paths) > 3 and names[0].endswith("0-later.cap")
    with open_captures(names) as captures:
        assert len(captures.readers) == len(first.paths) + 1
        assert captures.meta["file"]["index"] == 0
        records = list(captures.records())
        assert captures.current.name == str(tmp_path / "0-later.cap")
    assert records == [*written_a, (EVENTS, raw_events(10_000, 2)), (END, {"seen": 2})]


def test_open_captures_globs_stdin_and_files_named_twice(tmp_path, monkeypatch) -> None:
    writer, written = write_rotating(tmp_path / "cap.bin", 40, max_bytes=1000, file_count=None)
    pattern = str(tmp_path / "cap.bin*")
    with open_captures([pattern, writer.paths[0]]) as captures:  # quoted glob, and a name
        assert list(captures.records()) == written
    with open_captures(writer.paths[0]) as captures:  # one name, not a list
        assert list(captures.records()) == read_file(writer.paths[0])[1]
    with pytest.raises(CaptureError, match="no file matches"):
        open_captures([str(tmp_path / "nothing*")])
    stdin = types.SimpleNamespace(buffer=io.BytesIO(Path(writer.paths[0]).read_bytes()))
    monkeypatch.setattr(sys, "stdin", stdin)
    with open_captures(["-"]) as captures:
        assert captures.readers[0].name == "stdin"
        assert list(captures.records()) == read_file(writer.paths[0])[1]


def test_open_captures_checks_every_header_before_a_record(tmp_path) -> None:
    good = tmp_path / "good.cap"
    out = io.BytesIO()
    CaptureWriter(out, META).events(raw_events(0, 1))
    good.write_bytes(out.getvalue())
    bad = tmp_path / "bad.cap"
    bad.write_bytes(b"GET / HTTP/1.1\r\n\r\n")
    for paths, expected in (
        ([good, bad], rf"^{re.escape(str(bad))}: not a tcptrace capture"),
        ([good, tmp_path / "missing"], r"missing: No such file or directory$"),
        ([tmp_path], r": Is a directory$"),
        ([], r"^no capture file given$"),
    ):
        with pytest.raises(CaptureError, match=expected) as info:
            open_captures(paths)
        assert "\n" not in str(info.value)


# --- the document ---------------------------------------------------------------------


def doc_block(after: str, index: int = 0) -> str:
    text = DOC.read_text()
    return re.findall(r"```python\n(.*?)```", text[text.index(after) :], re.S)[index]


def test_the_documents_standard_library_reader_reads_a_capture(tmp_path, monkeypatch) -> None:
    data, records, _ends = small_capture()
    (tmp_path / "cap.bin").write_bytes(data)
    code = doc_block("## Reading a capture with the standard library")
    assert len(code.strip().splitlines()) <= 17  # "these 15 lines", imports included
    scope: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), scope)
    got = list(scope["read_events"](str(tmp_path / "cap.bin")))
    expected = [
        events.make_event(f)
        for t, p in records
        if t == EVENTS
        for f in events.EVENT_STRUCT.iter_unpack(p)
    ]
    assert [events.Event(**e) for e in got] == expected
    monkeypatch.chdir(tmp_path)
    counted = io.StringIO()
    monkeypatch.setattr(sys, "stdout", counted)
    exec(compile(doc_block("For example, to count"), str(DOC), "exec"), scope)
    assert counted.getvalue().strip() == "Counter({4: 3})"
    exec(compile(doc_block("From tcptrace itself"), str(DOC), "exec"), {})
    assert counted.getvalue().count("Event(ts_ns=") == 3


def test_the_document_names_the_constants() -> None:
    doc = DOC.read_text()
    assert f"| version | u16, `{capfile.VERSION}` |" in doc
    assert capfile.MAX_PAYLOAD == 1 << 30 and "at most 2^30 (1 GiB)" in doc
    assert capfile.MAX_HEADER_JSON == 1 << 20 and "at most 1 MiB" in doc
    for rtype in capfile.RecordType:
        assert f"| {int(rtype)} | {rtype.name} |" in doc
    assert "PATH.000001" in doc and capfile._ROTATION_DIGITS == 6


def test_a_deferred_capture_writes_nothing_until_its_first_record(tmp_path: Path) -> None:
    """--write opens its file at once (a bad path is said before tracing) but empties
    and writes it only with the first record: closed before, a file it made goes and
    one that was there stays as it was; --write -: nothing on the pipe."""
    made = tmp_path / "new.cap"
    RotatingWriter(made, meta=META, deferred=True).close()
    assert not made.exists()
    there = tmp_path / "there.cap"
    there.write_bytes(b"x" * 100)
    RotatingWriter(there, meta=META, deferred=True).close()
    assert there.read_bytes() == b"x" * 100
    writer = RotatingWriter(there, meta=META, deferred=True)
    writer.info({"kind": "test"})
    writer.close()
    with open_captures([str(there)]) as captures:
        assert [rtype for rtype, _ in captures.records()] == [INFO]
    out = io.BytesIO()
    piped = CaptureWriter(out, META, deferred=True)
    assert out.getvalue() == b""
    piped.info({"kind": "test"})
    assert out.getvalue().startswith(capfile.MAGIC)
