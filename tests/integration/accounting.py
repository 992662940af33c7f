"""Reading the summary's accounting in integration tests."""

from __future__ import annotations

import os


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


# Linux counts the tracepoint hits it skips while another BPF program runs on the CPU
# (bpf_prog_info.recursion_misses for tracepoints) only since 6.7; before, such a
# skip leaves no trace anywhere, so a shortfall can only be bounded.
MISSES_COUNTED_SINCE = (6, 7)
UNCOUNTED_MISS_BOUND = 0.01
UNEXPLAINED_SHORTFALL = 1e-4
UNSEEN_PAIR = 2


def kernel_counts_misses(release: str | None = None) -> bool:
    release = release or os.uname().release
    major, minor = (int(part) for part in release.split(".")[:2])
    return (major, minor) >= MISSES_COUNTED_SINCE


def assert_all_accounted(last_line: str, err: str, expected: int) -> None:
    """Every transition the workload made is traced, or was missed by the kernel and
    counted (misses count every TCP socket's, so they may exceed the shortfall)."""
    traced, _, _ = summary_numbers(last_line)
    # traced may exceed expected by a hit the nested program counted twice: it was
    # interrupted as it started by a softirq that made more than one hit (README)
    doubled = int(expected * UNEXPLAINED_SHORTFALL)
    if kernel_counts_misses():
        # Seen twice on 6.18 (4 hits short in a 360,000-transition soak, 4 of 20,000
        # with a stalled reader) even counting recursion_misses. Likely cause, since
        # fixed in churn.py: the churn closed its listener with connections still
        # queued, which end in a reset with one transition fewer. The bound stays
        # until soaks confirm it.
        # Also: now and then a client's FIN_WAIT1 -> FIN_WAIT2 -> CLOSE reaches no BPF
        # program at all, both hits (an independent raw-tracepoint counter misses the
        # same ones; test_timewait's KERNEL_UNREPORTED): one such pair is allowed.
        slack = max(UNSEEN_PAIR, int(expected * UNEXPLAINED_SHORTFALL))
        assert expected <= traced + missed(err) + slack, (last_line, err, expected)
        assert traced <= expected + doubled, (last_line, err, expected)
    else:
        assert expected * (1 - UNCOUNTED_MISS_BOUND) <= traced <= expected + doubled, (
            last_line,
            err,
            expected,
        )


def transition_lines(lines: list[str]) -> list[str]:
    """The text output's transition lines: after the header, before the summary (whose
    notes may quote a transition, 'FIN_WAIT2/CLOSING -> CLOSE')."""
    body = lines[1:]
    if "" in body:
        body = body[: body.index("")]
    return [line for line in body if " -> " in line]
