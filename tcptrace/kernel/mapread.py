"""Whole BPF maps read from user space in as few bpf() calls as the kernel allows.

Linux 5.6+ answers BPF_MAP_LOOKUP_BATCH: one call copies up to a given number of
entries, keys and values (every CPU's value of a per-CPU map). The live table and
the metrics read the kernel's histograms and counters this way: one call per map
instead of one per key (6,874 keys a summary: bcc's table API made 68,000 bpf()
calls in 10 s of an idle `-i 1`; BENCHMARKS.md, eighth session).

A kernel without the command answers EINVAL, a map type without the operation
ENOTSUPP (EOPNOTSUPP in newer kernels): then, from the first refusal on, that map
is read key by key as before, with the same result, and nothing is said (only the
cost differs). Cheaper still would be an mmapped array (BPF_F_MMAPABLE), no system
call at all, but the big maps are per-CPU arrays, which cannot be mmapped.

The loader hands this module libbcc's functions (it is the only module that
imports bcc); anything with bpf_lookup_batch, bpf_lookup_elem and bpf_get_next_key
of the same signatures will do.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

# The kernel's own "operation not supported" (include/linux/errno.h), which bpf()
# returns as is for a map type without batch operations before Linux 6.x.
ENOTSUPP = 524
# What a kernel without batch look-ups answers (see the module's doc).
NO_BATCH = frozenset({errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP, errno.ENOSYS})
# Bytes of the batch position token: a u32 bucket for hash maps, a key for the others.
_TOKEN_MIN = 8

ARRAY_KEY = struct.Struct("=I")


class MapReadError(OSError):
    """The kernel refused to read a map for another reason than lacking batches."""


class _Buffers:
    """One map's read buffers, kept from one read to the next."""

    def __init__(self, key_size: int, value_size: int, room: int) -> None:
        self.keys = ctypes.create_string_buffer(key_size * room)
        self.values = ctypes.create_string_buffer(value_size * room)
        self.token = ctypes.create_string_buffer(max(_TOKEN_MIN, key_size))


class MapReader:
    """Reads whole maps: in batches where the kernel can, else key by key."""

    def __init__(self, lib) -> None:
        self.lib = lib
        # map fds whose batch look-up the kernel refused: read key by key from then on
        self.key_by_key: set[int] = set()
        self._buffers: dict[int, _Buffers] = {}

    def read(
        self, fd: int, key_size: int, value_size: int, room: int, array: bool = False
    ) -> tuple[bytes, bytes]:
        """Every entry of the map, at most `room` of them: its keys and its values, each
        packed one after another (bytes of key_size and value_size each). `array`: the
        keys are 0 .. room-1 (an array map), which the key-by-key read needs no walk for.
        """
        bufs = self._buffers.get(fd)
        if bufs is None:
            bufs = self._buffers[fd] = _Buffers(key_size, value_size, room)
        count = None
        if fd not in self.key_by_key:
            count = self._batch(fd, key_size, value_size, room, bufs)
            if count is None:
                self.key_by_key.add(fd)
        if count is None:
            count = self._key_by_key(fd, key_size, value_size, room, array, bufs)
        # copies of the filled part only: .raw would copy the whole buffer
        return (
            ctypes.string_at(bufs.keys, key_size * count),
            ctypes.string_at(bufs.values, value_size * count),
        )

    def forget(self) -> None:
        """Let go of the buffers (the maps are about to go)."""
        self._buffers.clear()

    def _batch(
        self, fd: int, key_size: int, value_size: int, room: int, bufs: _Buffers
    ) -> int | None:
        """Entries read into bufs; None if the kernel has no batch look-up for this map."""
        lookup = getattr(self.lib, "bpf_lookup_batch", None)  # libbcc before 0.15 lacks it
        if lookup is None:
            return None
        token = ctypes.cast(bufs.token, ctypes.POINTER(ctypes.c_uint32))
        count = ctypes.c_uint32(0)
        total = 0
        while total < room:
            count.value = room - total
            rc = lookup(
                fd,
                token if total else None,
                token,
                ctypes.byref(bufs.keys, key_size * total),
                ctypes.byref(bufs.values, value_size * total),
                ctypes.byref(count),
            )
            if rc != 0:
                error = ctypes.get_errno() or -rc
                if error != errno.ENOENT:
                    if total == 0 and error in NO_BATCH:
                        return None
                    raise MapReadError(error, f"could not read a BPF map ({os.strerror(error)})")
                return total + count.value  # ENOENT: the end of the map, with what it copied
            total += count.value
            if count.value == 0:
                break  # no progress: a hash bucket changing under the read
        return total

    def _key_by_key(
        self, fd: int, key_size: int, value_size: int, room: int, array: bool, bufs: _Buffers
    ) -> int:
        """Entries read into bufs one look-up at a time (and one walk step, for a hash)."""
        lib = self.lib
        keys, values = bufs.keys, bufs.values
        total = 0
        if array:
            index = ctypes.c_uint32()
            at_index = ctypes.byref(index)
            for i in range(room):
                index.value = i
                if lib.bpf_lookup_elem(fd, at_index, ctypes.byref(values, value_size * total)) == 0:
                    ARRAY_KEY.pack_into(keys, key_size * total, i)
                    total += 1
            return total
        previous = None
        while total < room:
            key = ctypes.byref(keys, key_size * total)
            if lib.bpf_get_next_key(fd, previous, key) != 0:
                break  # the end (ENOENT)
            previous = key
            # an entry deleted since the walk found it is left out; the walk goes on from
            # its key (a hash map then starts over: bounded by room)
            if lib.bpf_lookup_elem(fd, key, ctypes.byref(values, value_size * total)) == 0:
                total += 1
        return total


def per_cpu_totals(
    keys: bytes, values: bytes, size: int, cpus: int, reduce=sum, width: int = 1
) -> list[int]:
    """A per-CPU array map whose values are `width` u64 each, as read: its `size`
    entries' values, each u64 reduced over the CPUs (sum by default, or max), one after
    another (size * width of them); entries the map did not return stay 0."""
    flat = memoryview(values).cast("Q")
    totals = [0] * (size * width)
    if width == 1:
        if cpus == 1:
            reduced = list(flat)
        else:
            reduced = list(map(reduce, zip(*(flat[cpu::cpus] for cpu in range(cpus)))))
        for index, value in zip(memoryview(keys).cast("I"), reduced):
            totals[index] = value
        return totals
    # rows of width u64, one per CPU per entry: most are all zeros (states never left)
    row_bytes = width * 8
    zeros = bytes(row_bytes)
    for entry, index in enumerate(memoryview(keys).cast("I")):
        first = entry * cpus
        rows = [
            flat[(first + cpu) * width : (first + cpu + 1) * width]
            for cpu in range(cpus)
            if values[(first + cpu) * row_bytes : (first + cpu + 1) * row_bytes] != zeros
        ]
        if rows:
            reduced = list(rows[0]) if len(rows) == 1 else list(map(reduce, zip(*rows)))
            totals[index * width : (index + 1) * width] = reduced
    return totals
