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
