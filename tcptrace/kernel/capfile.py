"""Capture files: the kernel's records saved as they come (--write), read back later (-r).

The format is described byte by byte in docs/capture-format.md; in short:

    header   magic (8) | version u16 | length u32 | JSON (length bytes) | CRC-32 u32
    records  type u16 | reserved u16 | length u32 | CRC-32 u32 | payload (length bytes)

Integers of the framing are little-endian. An EVENTS or LIVES payload is the kernel's
records end to end, in the kernel's own (native) layout and byte order, exactly as the
perf buffer gives them; the header's JSON says which layout and byte order that is.
INFO and END payloads are JSON objects.

Writing costs one write call per record (a perf read's whole batch is one record): no
per-event Python work, and a writer killed at any moment leaves a file readable up to
its last whole record. Reading checks everything: whatever is wrong with a file comes
out as one CaptureError line naming it, after every whole record before the damage.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import glob
import json
import os
import re
import socket
import stat
import struct
import sys
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, BinaryIO, Union

from tcptrace.errors import TcptraceError
from tcptrace.kernel.events import EVENT_FIELDS, EVENT_SIZE, LIFE_FIELDS, LIFE_SIZE

# PNG's trick: a byte with the high bit set catches 7-bit channels, CR LF catches a
# text-mode transfer that converted line endings; the rest names the program.
MAGIC = b"\x89TCPTR\r\n"
# The format this module writes and the newest it reads. Bumped only by a change an
# older reader must not skip (see the compatibility rules in docs/capture-format.md).
VERSION = 1
# magic, version, then the JSON's length; the version's place never changes, so any
# reader can name a newer version than its own.
_PREFIX = struct.Struct("<8sHI")
_VERSION_AT = 8
_CRC = struct.Struct("<I")
# type, reserved (0), payload length, then a CRC-32 of those three and the payload
_RECORD_HEAD = struct.Struct("<HHI")
_RECORD = struct.Struct("<HHII")
RECORD_HEADER_SIZE = _RECORD.size
# Bounds a reader trusts before reading: the header's JSON is small (what wrote the file
# and the layouts); a record's payload at most 1 GiB (a perf batch is ~200 KB, a start-up
# snapshot of a million sockets ~200 MB). The writer splits or refuses anything larger.
MAX_HEADER_JSON = 1 << 20
MAX_PAYLOAD = 1 << 30
# A path holding one of these that names no file is a pattern, globbed (a quoted -r "cap.bin*")
_GLOB_CHARS = frozenset("*?[")
# Payloads are read in pieces of this size, so a damaged length costs no huge allocation.
_READ_PIECE = 1 << 20
# Rotated files after the first: PATH.000001, PATH.000002, ...: zero-padded so that names
# sort as they were written, and `PATH*` globs them all.
_ROTATION_DIGITS = 6


class RecordType(enum.IntEnum):
    """A record's type (u16). 0 is never one: a zero-filled tail is damage."""

    EVENTS = 1  # struct tcptrace_event records, end to end (bytes)
    LIVES = 2  # struct tcptrace_life records, end to end (bytes)
    INFO = 3  # what user space learnt, a JSON object with a "kind" (dict)
    END = 4  # the kernel's counters at the end, a JSON object (dict)


EVENTS = RecordType.EVENTS
LIVES = RecordType.LIVES
INFO = RecordType.INFO
END = RecordType.END

# Header keys the caller fills (host_meta gives them all); the module adds LAYOUT, FILE.
KEY_TCPTRACE_VERSION = "tcptrace_version"
KEY_HOSTNAME = "hostname"
KEY_KERNEL_RELEASE = "kernel_release"
# wall-clock ns = an event's ts_ns (CLOCK_MONOTONIC, bpf_ktime_get_ns) + this
KEY_MONOTONIC_TO_WALL = "monotonic_to_wall_ns"
KEY_COMMAND = "command"
KEY_LAYOUT = "layout"
KEY_FILE = "file"
# An INFO record's kind, chosen by the caller
KEY_KIND = "kind"
_RESERVED_KEYS = frozenset({KEY_LAYOUT, KEY_FILE})

PathName = Union[str, "os.PathLike[str]"]


class CaptureError(TcptraceError):
    """A file that is not a capture, or not a whole one: a one-line message naming it."""


def _layout_json(fields: Iterable[tuple[str, str, int]], size: int) -> dict[str, Any]:
    return {"size": size, "fields": [list(f) for f in fields]}


def layout() -> dict[str, Any]:
    """This program's record layouts as a capture's header describes them."""
    return {
        "byte_order": sys.byteorder,
        "event": _layout_json(EVENT_FIELDS, EVENT_SIZE),
        "life": _layout_json(LIFE_FIELDS, LIFE_SIZE),
    }


def monotonic_to_wall_ns(tries: int = 5) -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC, in ns: the pair of readings closest together of
    a few (a preemption between the two readings would skew one pair)."""
    best_gap, offset = None, 0
    for _ in range(tries):
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        wall = time.time_ns()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best_gap is None or after - before < best_gap:
            best_gap, offset = after - before, wall - (before + after) // 2
    return offset


def host_meta(command: list[str], tcptrace_version: str) -> dict[str, Any]:
    """What wrote a capture, for CaptureWriter's meta: this host, now."""
    return {
        KEY_TCPTRACE_VERSION: tcptrace_version,
        KEY_HOSTNAME: socket.gethostname(),
        KEY_KERNEL_RELEASE: os.uname().release,
        KEY_MONOTONIC_TO_WALL: monotonic_to_wall_ns(),
        KEY_COMMAND: list(command),
    }


def _json_bytes(obj: Mapping[str, Any]) -> bytes:
    # ASCII with \u escapes: never fails on a lone surrogate (a /proc path decoded with
    # surrogateescape), and ASCII is UTF-8; NaN is no JSON, so other readers could choke
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode()


def _record(rtype: int, payload: bytes | bytearray | memoryview) -> bytes:
    """A whole record, header and payload, as one bytes for one write call."""
    head = _RECORD_HEAD.pack(rtype, 0, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, _CRC.pack(crc), payload))


def rotation_path(path: PathName, index: int) -> str:
    """The name of a rotation's file number `index`: PATH, then PATH.000001, ..."""
    path = os.fspath(path)
    return path if index == 0 else f"{path}.{index:0{_ROTATION_DIGITS}d}"


class CaptureWriter:
    """Writes a capture to `out`, which the caller owns (and closes).

    The header goes out at once, or with deferred with the first record: a run that
    fails before it traces anything then writes nothing (RotatingWriter removes the
    file it made). Each record is one out.write call, header and payload together;
    OSError (ENOSPC, EPIPE) propagates, and after one the writer refuses further
    records: they would follow a partial one. on_first runs before the first write
    (RotatingWriter's: the file is emptied only then).
    """

    def __init__(
        self,
        out: BinaryIO,
        meta: Mapping[str, Any],
        *,
        _part: tuple = (),
        deferred: bool = False,
        on_first: Callable[[], None] | None = None,
    ) -> None:
        reserved = _RESERVED_KEYS & set(meta)
        if reserved:
            raise ValueError(f"capture meta keys {sorted(reserved)} are the module's")
        # _part (RotatingWriter's): the run's id and start, and this file's index in it
        run, run_started_ns, index = _part or (uuid.uuid4().hex, time.time_ns(), 0)
        header = dict(meta)
        header[KEY_LAYOUT] = layout()
        header[KEY_FILE] = {
            "run": run,
            "run_started_wall_ns": run_started_ns,
            "index": index,
            "started_wall_ns": time.time_ns(),
        }
        text = _json_bytes(header)
        if len(text) > MAX_HEADER_JSON:
            raise ValueError(f"capture meta of {len(text)} bytes, over {MAX_HEADER_JSON}")
        head = _PREFIX.pack(MAGIC, VERSION, len(text)) + text
        self._out = out
        self.bytes_written = 0
        self.records_written = 0
        self._failed = False
        self._head: bytes | None = head + _CRC.pack(zlib.crc32(head))  # until written
        self._on_first = on_first
        if not deferred:
            self._write(b"")

    @property
    def started(self) -> bool:
        """The header is out (the first record was written, or tried)."""
        return self._head is None

    def _write(self, data: bytes) -> None:
        if self._failed:
            raise ValueError("capture writer: an earlier write failed, the file ends there")
        self._failed = True  # until the whole record is out
        if self._head is not None:
            data, self._head = self._head + data, None
            if self._on_first is not None:
                self._on_first()
        view = memoryview(data)
        while view:
            n = self._out.write(view)
            if n is None:  # a non-blocking raw file that takes nothing now
                raise BlockingIOError(errno.EAGAIN, "capture output would block")
            # a raw (unbuffered) file may write part (a signal, a disk filling up)
            view = view[n:]
        self._failed = False
        self.bytes_written += len(data)

    def _blocks(self, rtype: int, raw: bytes | bytearray | memoryview, size: int) -> None:
        if len(raw) % size:
            raise ValueError(f"{len(raw)} bytes is not a whole number of {size}-byte records")
        step = MAX_PAYLOAD // size * size  # never in practice: a perf batch is ~200 KB
        for start in range(0, len(raw), step):
            self._write(_record(rtype, raw[start : start + step]))
            self.records_written += 1

    def _json(self, rtype: int, obj: Mapping[str, Any]) -> None:
        payload = _json_bytes(obj)  # before writing anything: a TypeError writes nothing
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"a {len(payload)}-byte JSON record is over {MAX_PAYLOAD} bytes")
        self._write(_record(rtype, payload))
        self.records_written += 1

    def events(self, raw: bytes | bytearray | memoryview) -> None:
        """A block of struct tcptrace_event records, end to end (empty: nothing written)."""
        self._blocks(EVENTS, raw, EVENT_SIZE)

    def lives(self, raw: bytes | bytearray | memoryview) -> None:
        """A block of struct tcptrace_life records, end to end (--lifetime)."""
        self._blocks(LIVES, raw, LIFE_SIZE)

    def info(self, obj: Mapping[str, Any]) -> None:
        """Something user space learnt that a replay cannot: obj["kind"] says what."""
        if not isinstance(obj.get(KEY_KIND), str):
            raise ValueError(f'an INFO record needs a "{KEY_KIND}" string: {obj!r:.80}')
        self._json(INFO, obj)

    def end(self, obj: Mapping[str, Any]) -> None:
        """The kernel's counters at the end."""
        self._json(END, obj)

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        """Flushes; `out` stays open (the caller's)."""
        self.flush()


class RotatingWriter:
    """CaptureWriter's methods over a series of files, as tcpdump's -C and -W.

    After a record takes a file to max_bytes or past it, the next record starts a new
    file, a whole capture with its own header; with file_count, only the last file_count
    files are kept. File names: rotation_path(path, 0, 1, ...): PATH, PATH.000001, ...
    Rotation files of an earlier run at PATH (PATH.NNNNNN that begin as a capture) are
    deleted at the start, as writing PATH replaces the capture there.
    Files are unbuffered: a record is one write(2), whole on disk as soon as it returns.
    """

    def __init__(
        self,
        path: PathName,
        max_bytes: int | None = None,
        file_count: int | None = None,
        meta: Mapping[str, Any] | None = None,
        deferred: bool = False,
    ) -> None:
        """deferred: PATH is opened now, but emptied and written with the first record;
        closed before that, a file this made is removed and one that was there stays."""
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes}")
        if file_count is not None and file_count < 1:
            raise ValueError(f"file_count must be at least 1, not {file_count}")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.file_count = file_count
        self._meta = dict(meta or {})
        self._run = (uuid.uuid4().hex, time.time_ns())
        self._index = -1
        self._file: BinaryIO | None = None
        self._writer: CaptureWriter | None = None
        self._kept: deque[str] = deque()
        self._done_bytes = 0  # in files already closed
        self.records_written = 0
        self._created = False  # the first file did not exist before (removed if unused)
        self._deferred = deferred
        self._next_file()  # at once: a bad path fails before tracing

    @property
    def paths(self) -> list[str]:
        """The files kept so far, oldest first."""
        return list(self._kept)

    @property
    def bytes_written(self) -> int:
        return self._done_bytes + (self._writer.bytes_written if self._writer else 0)

    @property
    def starts_new_file(self) -> bool:
        """The next record opens a new file (a whole capture of its own): what each
        file must hold to be read alone goes first."""
        return self._writer is None

    def _next_file(self) -> None:
        self._index += 1
        name = rotation_path(self.path, self._index)
        first = self._index == 0 and self._deferred
        if first:
            # opened, not emptied: a run that fails before it traces leaves what was
            # there (and no file where there was none)
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                self._created = True
            except FileExistsError:
                fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC)
            self._file = open(fd, "wb", buffering=0)  # noqa: SIM115 (closed by _close_file)
        else:
            self._file = open(name, "wb", buffering=0)  # noqa: SIM115 (closed by _close_file)
        self._kept.append(name)
        if self._index == 0 and not first:
            _delete_stale_rotation(self.path)
        try:
            self._writer = CaptureWriter(
                self._file,
                self._meta,
                _part=(*self._run, self._index),
                deferred=first,
                on_first=self._begin if first else None,
            )
        except BaseException:
            self._close_file()
            raise
        while self.file_count is not None and len(self._kept) > self.file_count:
            _unlink(self._kept.popleft())

    def _begin(self) -> None:
        """The first record: now the file is emptied, and an earlier run's rotation
        files go (writing PATH replaces the capture there)."""
        assert self._file is not None
        if stat.S_ISREG(os.fstat(self._file.fileno()).st_mode):
            os.ftruncate(self._file.fileno(), 0)
        _delete_stale_rotation(self.path)

    def _close_file(self) -> None:
        if self._writer is not None:
            self._done_bytes += self._writer.bytes_written
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None

    def _record(self, method: str, arg: Any) -> None:
        if self._writer is None:
            self._next_file()
        writer = self._writer
        assert writer is not None
        before = writer.records_written
        getattr(writer, method)(arg)
        self.records_written += writer.records_written - before
        if self.max_bytes is not None and writer.bytes_written >= self.max_bytes:
            # the next file opens with the next record: a file only ever ends whole,
            # and a run that stops here leaves no header-only file
            self._close_file()

    def events(self, raw: bytes | bytearray | memoryview) -> None:
        if len(raw):
            self._record("events", raw)

    def lives(self, raw: bytes | bytearray | memoryview) -> None:
        if len(raw):
            self._record("lives", raw)

    def info(self, obj: Mapping[str, Any]) -> None:
        self._record("info", obj)

    def end(self, obj: Mapping[str, Any]) -> None:
        self._record("end", obj)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Closes the file; one this run made and never wrote (it failed before tracing)
        is removed."""
        unused = self._index == 0 and self._writer is not None and not self._writer.started
        self._close_file()
        if unused and self._created:
            _unlink(self.path)
            self._created = False

    def __enter__(self) -> RotatingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # someone else removed it: the aim
        os.unlink(name)


def _delete_stale_rotation(path: str) -> None:
    folder, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + rf"\.\d{{{_ROTATION_DIGITS},}}\Z")
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return  # the first open names the problem
    for name in names:
        if not pattern.match(name):
            continue
        full = os.path.join(folder, name)
        try:
            with open(full, "rb") as f:
                ours = f.read(len(MAGIC)) == MAGIC  # never delete what is not a capture
        except OSError:
            continue
        if ours:
            _unlink(full)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _first_difference(theirs: Any, ours: dict[str, Any]) -> str | None:
    """How a capture's layout description differs from ours, or None."""
    if not isinstance(theirs, dict):
        return "it has no layout"
    if theirs.get("size") != ours["size"]:
        return f"{theirs.get('size')} bytes there, {ours['size']} here"
    fields = theirs.get("fields")
    if not isinstance(fields, list):
        return "its fields are not listed"
    for there, here in zip(fields, ours["fields"]):
        if there != here:
            return f"field {there!r} there, {here!r} here"
    if len(fields) != len(ours["fields"]):
        return f"{len(fields)} fields there, {len(ours['fields'])} here"
    return None


class CaptureReader:
    """Reads a capture from `inp` (the caller's); `name` names it in every error.

    The header is read and checked at once (.meta is its JSON object). records() then
    yields (RecordType, payload): bytes for EVENTS and LIVES, a dict for INFO and END.
    Types this version does not know are skipped (the format allows new ones).
    """

    def __init__(self, inp: BinaryIO, name: str) -> None:
        self._inp = inp
        self.name = name
        self.records_read = 0
        self.bytes_read = 0  # up to the end of the last whole record
        self._lives_checked = False
        self.version = 0  # the file's format version, once read
        self.meta = self._header()

    def _error(self, what: str) -> CaptureError:
        return CaptureError(f"{self.name}: {what}")

    def _read(self, n: int) -> bytes:
        """n bytes, fewer only at the end of the input."""
        parts = []
        while n > 0:
            try:
                part = self._inp.read(min(n, _READ_PIECE))
            except OSError as exc:
                raise self._error(f"cannot read: {exc.strerror or exc}") from None
            if not part:
                break
            parts.append(part)
            n -= len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _header(self) -> dict[str, Any]:
        prefix = self._read(_PREFIX.size)
        if not prefix:
            raise self._error("empty, not a tcptrace capture")
        if not prefix.startswith(MAGIC[: len(prefix)]):
            if prefix.startswith(MAGIC[:6]):
                raise self._error("damaged capture header (line endings converted in transfer?)")
            raise self._error("not a tcptrace capture (it does not begin with a capture header)")
        if len(prefix) > _VERSION_AT + 1:
            version = int.from_bytes(prefix[_VERSION_AT : _VERSION_AT + 2], "little")
            if version > VERSION:
                raise self._error(
                    f"written by a newer tcptrace: format version {version}, "
                    f"this one reads {VERSION}"
                )
            if version < 1:
                raise self._error(f"damaged capture header (format version {version})")
        if len(prefix) < _PREFIX.size:
            raise self._error(f"truncated in its header, after {len(prefix)} bytes")
        _magic, self.version, length = _PREFIX.unpack(prefix)
        if length > MAX_HEADER_JSON:
            raise self._error(f"damaged capture header (a description of {length} bytes)")
        text = self._read(length)
        crc = self._read(_CRC.size)
        if len(text) + len(crc) < length + _CRC.size:
            got = _PREFIX.size + len(text) + len(crc)
            raise self._error(f"truncated in its header, after {got} bytes")
        if _CRC.unpack(crc)[0] != zlib.crc32(text, zlib.crc32(prefix)):
            raise self._error("damaged capture header (checksum mismatch)")
        try:
            meta = json.loads(text.decode())
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
            meta = None
        if not isinstance(meta, dict):
            raise self._error("damaged capture header (its description is not a JSON object)")
        self.bytes_read = _PREFIX.size + length + _CRC.size
        self._check_layout(meta, "event")
        return meta

    def _check_layout(self, meta: dict[str, Any], which: str) -> None:
        """A capture whose records are laid out otherwise than ours cannot be replayed."""
        theirs = meta.get(KEY_LAYOUT)
        if not isinstance(theirs, dict):
            raise self._error("damaged capture header (it has no record layout)")
        order = theirs.get("byte_order")
        if order != sys.byteorder:
            raise self._error(
                f"written on a {order}-endian machine, this one is {sys.byteorder}-endian: "
                "replay across byte orders is not supported"
            )
        ours = layout()[which]
        diff = _first_difference(theirs.get(which), ours)
        if diff is not None:
            by = meta.get(KEY_TCPTRACE_VERSION, "an unknown version")
            raise self._error(
                f"its {which} records are laid out otherwise than this tcptrace's "
                f"(written by tcptrace {by}): {diff}"
            )

    def records(self) -> Iterator[tuple[RecordType, Any]]:
        """Every whole record; then CaptureError if the input ends inside one or a
        record is damaged, saying how much was whole."""
        known = set(RecordType)
        while True:
            head = self._read(_RECORD.size)
            if not head:
                return
            if len(head) < _RECORD.size:
                raise self._truncated(len(head))
            rtype, _reserved, length, crc = _RECORD.unpack(head)
            if length > MAX_PAYLOAD:
                raise self._damaged(f"a length of {length} bytes")
            payload = self._read(length)
            if len(payload) < length:
                raise self._truncated(len(head) + len(payload))
            if zlib.crc32(payload, zlib.crc32(head[: _RECORD_HEAD.size])) != crc:
                raise self._damaged("checksum mismatch")
            if rtype not in known:  # a newer writer's type: checked, then skipped
                self.records_read += 1
                self.bytes_read += _RECORD.size + length
                continue
            value = self._payload(RecordType(rtype), payload)
            self.records_read += 1
            self.bytes_read += _RECORD.size + length
            yield RecordType(rtype), value

    def _payload(self, rtype: RecordType, payload: bytes) -> Any:
        if rtype in (EVENTS, LIVES):
            size = EVENT_SIZE if rtype == EVENTS else LIFE_SIZE
            if rtype == LIVES and not self._lives_checked:
                # checked here, not in the header: a capture without --lifetime has none
                self._check_layout(self.meta, "life")
                self._lives_checked = True
            if len(payload) % size:
                raise self._damaged(f"{len(payload)} bytes of {size}-byte records")
            return payload
        try:
            obj = json.loads(payload.decode())
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise self._damaged(f"its {rtype.name} record is not a JSON object")
        return obj

    def _whole(self) -> str:
        return f"{_plural(self.records_read, 'whole record')} ({self.bytes_read} bytes) read"

    def _truncated(self, extra: int) -> CaptureError:
        return self._error(
            f"truncated: {_plural(extra, 'byte')} of a record after the last whole one; "
            f"{self._whole()}"
        )

    def _damaged(self, why: str) -> CaptureError:
        return self._error(f"damaged record at byte {self.bytes_read} ({why}); {self._whole()}")


def _order_key(reader: CaptureReader, position: int) -> tuple:
    """Runs by their start (wall clock, as written in each header), a run's files by
    their index in it; names play no part."""
    part = reader.meta.get(KEY_FILE)
    if not isinstance(part, dict):
        part = {}  # another writer's file: first, in the order given
    started, index = part.get("run_started_wall_ns"), part.get("index")
    return (
        started if isinstance(started, int) else 0,
        str(part.get("run", "")),
        index if isinstance(index, int) else 0,
        position,
    )


class CaptureSet:
    """Several captures read one after another in time order (open_captures' result)."""

    def __init__(self, readers: list[CaptureReader], owned: list[BinaryIO]) -> None:
        self.readers = readers  # in time order
        self._owned = owned
        self.current: CaptureReader = readers[0]  # the one records() is reading

    @property
    def meta(self) -> dict[str, Any]:
        """The first capture's header."""
        return self.readers[0].meta

    def records(self) -> Iterator[tuple[RecordType, Any]]:
        for reader in self.readers:
            self.current = reader
            yield from reader.records()

    def close(self) -> None:
        for f in self._owned:
            f.close()

    def __enter__(self) -> CaptureSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _expand(paths: Iterable[PathName]) -> list[str]:
    """Paths as given; one that names no file but holds a pattern is globbed (a quoted
    `-r 'cap.bin*'`), its matches in name order."""
    out = []
    for path in map(os.fspath, paths):
        if path != "-" and not os.path.lexists(path) and _GLOB_CHARS & set(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise CaptureError(f"{path}: no file matches")
            out.extend(matches)
        else:
            out.append(path)
    return out


def open_captures(paths: Iterable[PathName]) -> CaptureSet:
    """Opens the captures at `paths` ("-": standard input) and checks every header before
    a record is read; the result's records() reads them in time order, each file once.
    Errors, opening included, are CaptureError."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]  # one name, not its characters
    readers: list[tuple[tuple, CaptureReader]] = []
    owned: list[BinaryIO] = []
    seen: set[tuple[int, int]] = set()
    try:
        for position, path in enumerate(_expand(paths)):
            if path == "-":
                inp, name = sys.stdin.buffer, "stdin"
            else:
                name = path
                try:
                    inp = open(path, "rb")  # noqa: SIM115 (closed by CaptureSet.close)
                except OSError as exc:
                    raise CaptureError(f"{path}: {exc.strerror or exc}") from None
                owned.append(inp)
                stat = os.fstat(inp.fileno())
                if (stat.st_dev, stat.st_ino) in seen:  # named twice (a glob and a name)
                    continue
                seen.add((stat.st_dev, stat.st_ino))
            reader = CaptureReader(inp, name)
            readers.append((_order_key(reader, position), reader))
        if not readers:
            raise CaptureError("no capture file given")
    except BaseException:
        for f in owned:
            f.close()
        raise
    readers.sort(key=lambda kr: kr[0])
    return CaptureSet([r for _k, r in readers], owned)
