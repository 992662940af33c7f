"""The benchmark scripts run and report what they promise (small runs)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(script: str, *args: str) -> list[str]:
    """A benchmark's output lines; it must exit 0."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.host_only  # user space only, on recorded events
def test_consumer_benchmark_reports_each_step():
    lines = run_benchmark("consumer.py", "--events", "20000", "--batch", "512")
    assert lines[0].startswith("20,000 events, text, 512 records per ring read")
    steps = {line.split()[0] for line in lines[1:]}
    assert {"parse", "unpack", "sort", "Owners", "TimeWait", "TextOutput", "total"} <= steps


def test_sockdiag_benchmark_dumps_every_socket_both_ways():
    # as root (a network namespace of its own): CI runs as root, and so must this
    lines = run_benchmark("sockdiag.py", "--sockets", "300", "--rounds", "1")
    assert lines[0].startswith("300 timewait sockets")
    # both read exactly our 300 sockets: the namespace holds nothing else
    assert [line.split()[2] for line in lines[1:3]] == ["300", "300"]
    assert "faster a row" in lines[3]
