"""Reading the kernel's per-CPU perf rings directly, a whole batch at a time.

bcc's perf reader calls back into Python once per event (about 3 µs each); at a
few hundred thousand transitions a second that alone eats a core. Here each
CPU's ring is mmapped, what lies between the consumer's tail and the kernel's
head is copied out in one slice (at most READ_RECORDS records, so a batch stays
small however far the reader lags), and the fixed-size sample records in it
are unpacked in one struct.iter_unpack call. The kernel wakes us only when a ring
is a quarter full (a watermark), so at high rates one wake-up serves thousands
of events; the caller's poll timeout bounds the delay at low rates.

No bcc here: perf_event_open through ctypes, mmap, os. The loader puts each
ring's fd into the BPF program's perf event array.

Ordering: the kernel publishes data_head only after the record is written; the
reader loads data_head, then copies, then stores data_tail. x86 orders these
loads and stores as required (TSO); on weakly ordered CPUs the interpreter's
many intervening instructions make a stale read very unlikely but not
impossible (perf's C readers issue a read barrier there).

Record layout (include/uapi/linux/perf_event.h): a perf_event_header
{u32 type; u16 misc; u16 size}, then for PERF_RECORD_SAMPLE with
PERF_SAMPLE_RAW {u32 raw_size; raw bytes, padded so the record is a multiple
of 8 bytes}, for PERF_RECORD_LOST {u64 id; u64 lost}.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import select
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_BPF_OUTPUT = 10
PERF_SAMPLE_RAW = 1 << 10
PERF_FLAG_FD_CLOEXEC = 1 << 3
ATTR_FLAG_WATERMARK = 1 << 14  # wakeup_watermark counts bytes, not events
PERF_RECORD_LOST = 2
PERF_RECORD_SAMPLE = 9

HEADER = struct.Struct("=IHH")  # type, misc, size
SAMPLE_PREFIX = HEADER.size + 4  # header, then u32 raw_size
LOST = struct.Struct("=QQ")  # id, lost
U64 = struct.Struct("=Q")
# Records read from one ring at a time (about 200 KB): a batch's objects on
# their way to the output stay a few MB however far the reader lags.
READ_RECORDS = 2048
NS_PER_MS = 1_000_000
# Held-back records (time order) are read again this long after the last read at the
# soonest: at high rates some are held at every read, and reading as soon as they
# may go made batches of ~100 records whose fixed costs (a pass of every stage,
# telling the kernel how far the rings were read) cost more than the records' own.
# Up to this much later on the screen; a ring filling past its watermark is read
# at once all the same.
MIN_READ_INTERVAL_NS = 10 * NS_PER_MS
# struct perf_event_mmap_page: the ring's control page
DATA_HEAD_OFFSET = 1024
DATA_TAIL_OFFSET = 1032

# perf_event_open(2) by architecture (the syscall has no libc wrapper)
_SYSCALL_NR = {
    "x86_64": 298,
    "aarch64": 241,
    "riscv64": 241,
    "ppc64le": 319,
    "s390x": 331,
    "i686": 336,
    "armv7l": 364,
}


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to PERF_ATTR_SIZE_VER5 (112 bytes)."""

    _fields_ = (
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup", ctypes.c_uint32),  # wakeup_events or wakeup_watermark
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
        ("config2", ctypes.c_uint64),
        ("branch_sample_type", ctypes.c_uint64),
        ("sample_regs_user", ctypes.c_uint64),
        ("sample_stack_user", ctypes.c_uint32),
        ("clockid", ctypes.c_int32),
        ("sample_regs_intr", ctypes.c_uint64),
        ("aux_watermark", ctypes.c_uint32),
        ("sample_max_stack", ctypes.c_uint16),
        ("reserved", ctypes.c_uint16),
    )


def record_size(sample_size: int) -> int:
    """Bytes one PERF_RECORD_SAMPLE of a raw sample takes in the ring."""
    return HEADER.size + ((4 + sample_size + 7) & ~7)


def record_struct(sample: struct.Struct) -> struct.Struct:
    """A struct that unpacks a whole sample record to the sample's fields (header skipped)."""
    body = sample.format.lstrip("=<>!@")
    pad = record_size(sample.size) - SAMPLE_PREFIX - sample.size
    return struct.Struct(f"={SAMPLE_PREFIX}x{body}{pad}x")


@dataclass
class Parsed:
    """What one chunk of a ring held."""

    # runs of back-to-back sample records of the expected size
    runs: list[bytes] = field(default_factory=list)
    lost: int = 0  # events the kernel reported lost (PERF_RECORD_LOST)
    samples: int = 0
    skipped: int = 0  # records of other types or sizes
    consumed: int = 0  # bytes of the chunk's whole records (a chunk may end mid-record)


def parse(chunk: bytes, sample_size: int) -> Parsed:
    """Split the bytes copied out of a ring into runs of sample records and lost counts."""
    out = Parsed()
    if not chunk:
        return out
    rsize = record_size(sample_size)
    n = _regular(chunk, rsize)
    if n is not None:
        out.runs.append(chunk)
        out.samples = n
        out.consumed = len(chunk)
        return out
    # Slow path (after overflow, or a foreign record): walk record by record.
    run_start = None
    end = 0  # after the last whole record
    for pos, rtype, size in _walk(chunk):
        end = pos + size
        if rtype == PERF_RECORD_SAMPLE and size == rsize:
            if run_start is None:
                run_start = pos
            out.samples += 1
            continue
        if run_start is not None:
            out.runs.append(chunk[run_start:pos])
            run_start = None
        if rtype == PERF_RECORD_LOST and size >= HEADER.size + LOST.size:
            out.lost += LOST.unpack_from(chunk, pos + HEADER.size)[1]
        else:
            out.skipped += 1
    if run_start is not None:
        out.runs.append(chunk[run_start:end])
    out.consumed = end
    return out


def _walk(chunk: bytes) -> Iterator[tuple[int, int, int]]:
    """(offset, type, size) of each whole record; stops at a partial or corrupt one."""
    pos = 0
    end = len(chunk)
    while pos + HEADER.size <= end:
        rtype, _misc, size = HEADER.unpack_from(chunk, pos)
        if size < HEADER.size or pos + size > end:
            return  # the chunk ends mid-record, or a corrupt size: stop, never loop
        yield pos, rtype, size
        pos += size


def _regular(chunk: bytes, rsize: int) -> int | None:
    """How many records the chunk holds when every one is a sample of rsize bytes, else None.

    Checking the type and size bytes at each multiple of rsize (C-speed slices)
    proves the walk is regular.
    """
    n, rest = divmod(len(chunk), rsize)
    if (
        not rest
        and chunk[0::rsize] == bytes((PERF_RECORD_SAMPLE,)) * n
        and chunk[6::rsize] == bytes((rsize & 0xFF,)) * n
        and chunk[7::rsize] == bytes((rsize >> 8,)) * n
    ):
        return n
    return None


def _stamp(chunk: bytes, pos: int) -> int:
    """The time stamp of the sample record at pos: the sample's leading u64."""
    return U64.unpack_from(chunk, pos + SAMPLE_PREFIX)[0]


def last_stamp(chunk: bytes, sample_size: int) -> int | None:
    """Time stamp of the chunk's last whole sample record (None if it holds none)."""
    rsize = record_size(sample_size)
    n = _regular(chunk, rsize)
    if n is not None:
        return _stamp(chunk, (n - 1) * rsize) if n else None
    last = None
    for pos, rtype, size in _walk(chunk):
        if rtype == PERF_RECORD_SAMPLE and size == rsize:
            last = pos
    return None if last is None else _stamp(chunk, last)


def cut_before(chunk: bytes, sample_size: int, frontier_ns: int) -> tuple[int, int | None]:
    """Where the first sample stamped after frontier_ns starts, and its stamp.

    (len(chunk), None) when there is none: everything may go on.
    """
    rsize = record_size(sample_size)
    n = _regular(chunk, rsize)
    if n is not None:
        # bisect_right over the records' stamps, read in place (bisect's key= is 3.10+)
        index, hi = 0, n
        while index < hi:
            mid = (index + hi) // 2
            if frontier_ns < _stamp(chunk, mid * rsize):
                hi = mid
            else:
                index = mid + 1
        if index == n:
            return len(chunk), None
        return index * rsize, _stamp(chunk, index * rsize)
    for pos, rtype, size in _walk(chunk):
        if rtype == PERF_RECORD_SAMPLE and size == rsize:
            stamp = _stamp(chunk, pos)
            if stamp > frontier_ns:
                return pos, stamp
    return len(chunk), None


def iter_samples(run: bytes, sample_size: int) -> Iterator[bytes]:
    """The raw sample bytes of each record in a run."""
    rsize = record_size(sample_size)
    for pos in range(0, len(run), rsize):
        yield run[pos + SAMPLE_PREFIX : pos + SAMPLE_PREFIX + sample_size]


class Ring:
    """One CPU's mmapped perf ring: the control page, then 2^n data pages."""

    def __init__(self, fd: int, cpu: int, pages: int) -> None:
        self.fd = fd
        self.cpu = cpu
        page = mmap.PAGESIZE
        self.data_size = pages * page
        self.map = mmap.mmap(fd, page + self.data_size, mmap.MAP_SHARED)
        self.data_offset = page
        self.tail = U64.unpack_from(self.map, DATA_TAIL_OFFSET)[0]
        self.samples = 0  # sample records consumed so far

    def pending(self) -> int:
        """Bytes the kernel has written that were not released yet."""
        return U64.unpack_from(self.map, DATA_HEAD_OFFSET)[0] - self.tail

    def peek(self, limit: int | None = None) -> bytes:
        """Up to `limit` bytes of what the kernel wrote since the tail, copied out.

        The space stays the kernel's until release(): the copy may end mid-record.
        """
        length = self.pending()
        if limit is not None:
            length = min(length, limit)
        if length <= 0:
            return b""
        size = self.data_size
        base = self.data_offset
        start = self.tail % size
        if start + length <= size:
            return self.map[base + start : base + start + length]
        first = size - start
        return self.map[base + start : base + size] + self.map[base : base + length - first]

    def release(self, nbytes: int) -> None:
        """Hand the first nbytes after the tail back to the kernel (they were copied)."""
        self.tail += nbytes
        U64.pack_into(self.map, DATA_TAIL_OFFSET, self.tail)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def perf_event_open(attr: PerfEventAttr, cpu: int) -> int:
    nr = _SYSCALL_NR.get(platform.machine())
    if nr is None:
        raise OSError(f"perf_event_open: unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(
        ctypes.c_long(nr),
        ctypes.byref(attr),
        ctypes.c_int(-1),  # any process
        ctypes.c_int(cpu),
        ctypes.c_int(-1),  # no group
        ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"perf_event_open on CPU {cpu}: {os.strerror(err)}")
    return int(fd)


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> list[int]:
    """CPU numbers from a list such as 0-3,6."""
    with open(path) as fh:
        text = fh.read().strip()
    cpus: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


class PerfReader:
    """The rings of every online CPU, read in bulk.

    pages: data pages per CPU (a power of two). The kernel wakes the reader when
    a ring is a quarter full; read(timeout_ms) also returns when the timeout ends.
    """

    def __init__(self, sample: struct.Struct, pages: int, cpus: list[int] | None = None) -> None:
        if pages <= 0 or pages & (pages - 1):
            raise ValueError(f"perf buffer pages must be a power of two, not {pages}")
        self.pages = pages
        self.sample_size = sample.size
        self.record = record_struct(sample)
        self.rings: list[Ring] = []
        self.lost = 0  # events the kernel reported lost (PERF_RECORD_LOST)
        self.skipped = 0
        self.more = False  # the last read_runs() left records in a ring that can go now
        # when records the last read_runs() held back for time order may go (monotonic ns)
        self.release_at_ns: int | None = None
        self.read_ns = 0  # when read_runs last began (monotonic ns)
        self.epoll = select.epoll()
        try:
            for cpu in online_cpus() if cpus is None else cpus:
                attr = PerfEventAttr()
                attr.type = PERF_TYPE_SOFTWARE
                attr.size = ctypes.sizeof(PerfEventAttr)
                attr.config = PERF_COUNT_SW_BPF_OUTPUT
                attr.sample_period = 1
                attr.sample_type = PERF_SAMPLE_RAW
                attr.flags = ATTR_FLAG_WATERMARK
                attr.wakeup = pages * mmap.PAGESIZE // 4
                fd = perf_event_open(attr, cpu)
                try:
                    ring = Ring(fd, cpu, pages)
                except OSError:
                    os.close(fd)
                    raise
                self.rings.append(ring)
                self.epoll.register(fd, select.EPOLLIN)
        except OSError:
            self.close()
            raise

    def fds(self) -> dict[int, int]:
        """cpu -> ring fd, for the BPF program's perf event array."""
        return {ring.cpu: ring.fd for ring in self.rings}

    def wait(self, timeout_ms: int) -> None:
        """Sleep until a ring passes its watermark or the timeout ends.

        No sleep while the last read left records behind that can go now; no longer
        than until held-back records may go (see read_runs).
        """
        if self.more or timeout_ms <= 0:
            return
        if self.release_at_ns is not None:
            due = max(self.release_at_ns, self.read_ns + MIN_READ_INTERVAL_NS)
            left_ms = -(-(due - time.monotonic_ns()) // NS_PER_MS)
            timeout_ms = min(timeout_ms, max(1, left_ms))
        self.epoll.poll(timeout_ms / 1000)

    def read_runs(self, hold_ns: int | None = None) -> list[bytes]:
        """Read every ring, at most READ_RECORDS records each; runs of sample records.

        The bound keeps a batch, and the memory it takes on its way to the output,
        the same size however far the reader has fallen behind; `more` tells
        whether a ring still holds records that can be read now.

        Time order across CPUs: each ring is in order, and with hold_ns only the
        samples that no ring can still precede are taken, so that one batch follows
        the other in time. A ring read to its end can still receive samples stamped
        up to hold_ns before the read began (stamped, not yet written); a ring read
        up to the bound, nothing older than its last sample read. Later samples stay
        in their ring for the next read; `release_at_ns` says when the first of them
        may go. hold_ns None takes everything (nothing more will be written).
        """
        started = self.read_ns = time.monotonic_ns()
        size = self.sample_size
        limit = READ_RECORDS * record_size(size)
        chunks = [ring.peek(limit) for ring in self.rings]
        truncated = [len(chunk) == limit for chunk in chunks]  # one per ring, as chunks
        frontier = None
        if hold_ns is not None:
            frontier = started - hold_ns
            for chunk, bounded in zip(chunks, truncated):
                last = last_stamp(chunk, size) if bounded else None
                if last is not None:
                    frontier = min(frontier, last)
        runs: list[bytes] = []
        self.more = False
        self.release_at_ns = None
        for ring, chunk, bounded in zip(self.rings, chunks, truncated):
            held = None
            if frontier is not None:
                end, held = cut_before(chunk, size, frontier)
            if held is not None:
                assert hold_ns is not None
                parsed = parse(chunk[:end], size)
                release = end  # whole records: the held ones are read again next time
                due = held + hold_ns
                if self.release_at_ns is None or due < self.release_at_ns:
                    self.release_at_ns = due
            else:
                parsed = parse(chunk, size)
                # a complete chunk goes back whole (even past a corrupt record); a
                # truncated one up to its last whole record: the rest is read next time
                release = parsed.consumed if bounded and parsed.consumed else len(chunk)
                self.more = self.more or bounded
            ring.release(release)
            ring.samples += parsed.samples
            self.lost += parsed.lost
            self.skipped += parsed.skipped
            runs.extend(parsed.runs)
        return runs

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
        self.rings = []
        self.epoll.close()
