"""The consumer benchmark runs and accounts for every step (a small replay)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "consumer.py"


def test_consumer_benchmark_reports_each_step():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--events", "20000", "--batch", "512"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("20,000 events, text, 512 records per ring read")
    steps = {line.split()[0] for line in lines[1:]}
    assert {"parse", "unpack", "sort", "Owners", "TimeWait", "TextOutput", "total"} <= steps


SOCKDIAG = SCRIPT.parent / "sockdiag.py"


def test_sockdiag_benchmark_dumps_every_socket_both_ways():
    # as root (a network namespace of its own): CI runs as root, and so must this
    done = subprocess.run(
        [sys.executable, str(SOCKDIAG), "--sockets", "300", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("300 timewait sockets")
    # both read exactly our 300 sockets: the namespace holds nothing else
    assert [line.split()[2] for line in lines[1:3]] == ["300", "300"]
    assert "faster a row" in lines[3]
