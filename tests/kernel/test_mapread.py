"""Per-CPU values as a batch read returns them, reduced over the CPUs."""

from __future__ import annotations

import struct

from tcptrace.kernel.mapread import per_cpu_totals


def packed(keys: list[int], per_cpu: list[list[int]]) -> tuple[bytes, bytes]:
    """A batch's keys (u32) and values (every CPU's u64s, one entry after another)."""
    flat = [v for entry in per_cpu for v in entry]
    return struct.pack(f"={len(keys)}I", *keys), struct.pack(f"={len(flat)}Q", *flat)


def test_each_key_is_summed_over_the_cpus_where_its_key_says():
    # three CPUs; entries 0, 2 and 3 of a map of 5 (entry 1 and 4 were not returned)
    keys, values = packed([0, 2, 3], [[1, 2, 3], [0, 0, 0], [10, 0, 5]])
    assert per_cpu_totals(keys, values, 5, 3) == [6, 0, 0, 15, 0]
    assert per_cpu_totals(keys, values, 5, 3, max) == [3, 0, 0, 10, 0]


def test_one_cpu():
    keys, values = packed([1, 0], [[7], [9]])
    assert per_cpu_totals(keys, values, 2, 1) == [9, 7]


def test_rows_each_slot_summed_over_the_cpus():
    # two entries of rows of 4 u64, two CPUs: CPU 0's row, then CPU 1's, per entry
    width = 4
    keys, values = packed(
        [0, 1],
        [
            [1, 0, 0, 2, 0, 3, 0, 1],  # entry 0: CPU 0's row, CPU 1's row
            [0, 0, 0, 0, 0, 0, 4, 0],  # entry 1: CPU 1 only (CPU 0's row is skipped)
        ],
    )
    totals = per_cpu_totals(keys, values, 3, 2, sum, width)
    assert totals == [1, 3, 0, 3, 0, 0, 4, 0, 0, 0, 0, 0]
    assert per_cpu_totals(keys, values, 3, 2, max, width)[:4] == [1, 3, 0, 2]


def test_all_zero_rows_stay_zero():
    keys, values = packed([0, 1], [[0] * 8, [0] * 8])
    assert per_cpu_totals(keys, values, 2, 2, sum, 4) == [0] * 8
