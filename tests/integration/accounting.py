"""Reading the summary's accounting in integration tests."""

from __future__ import annotations


def accounting_line(lines: list[str]) -> str:
    """The summary's 'N transitions traced, ...' line (notes may follow it)."""
    return next(line for line in reversed(lines) if " transitions traced, " in line)


def summary_numbers(last_line: str) -> tuple[int, int, int]:
    """'N transitions traced, M shown, L lost...' -> (N, M, L)."""
    parts = last_line.split(", ")
    return int(parts[0].split()[0]), int(parts[1].split()[0]), int(parts[2].split()[0])


def missed(err: str) -> int:
    """Transitions the kernel skipped, from stderr ('up to K transitions were never seen')."""
    for line in err.splitlines():
        if "transitions were never seen" in line:
            return int(line.split("up to ")[1].split()[0])
    return 0


def assert_all_accounted(last_line: str, err: str, expected: int) -> None:
    """Every transition the workload made is traced, or was missed by the kernel and
    counted (misses count every TCP socket's, so they may exceed the shortfall)."""
    traced, _, _ = summary_numbers(last_line)
    assert traced <= expected <= traced + missed(err), (last_line, err, expected)
