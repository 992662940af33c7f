#!/usr/bin/env python3
"""What an idle tcptrace costs: its CPU and its system calls with no traffic.

Run as root from the repository, with the venv's Python (bcc must import):

    .venv/bin/python benchmarks/idle.py                       # every case, 30 s of CPU each
    .venv/bin/python benchmarks/idle.py --case i1 --repeat 3  # one case, three times

Each case starts tcptrace on a free loopback port nobody uses, waits until it
traces and a few frames went by, then measures

1. its CPU: utime + stime from /proc/PID/stat over --seconds, as a percentage
   of one CPU (nothing else watches it meanwhile);
2. its system calls: `strace -c -f -p PID` attached for --strace-seconds
   (every thread), the total and the bpf() calls. strace slows what it traces:
   its counts are what tcptrace asked for, its CPU is measured without it.

Cases: `i1` (`-p P -i 1`, the live table every second, to a file), `i0.1`
(`-i 0.1`), and `metrics` (`--quiet --metrics M`, scraped ten times a second
by curl on 127.0.0.1, a new connection each time, as a scraper does), `quiet`
(`--quiet`) and `stuck` (`--stuck CLOSE_WAIT=60s`, the watcher alone).

This script is not part of the tcptrace package.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from churn import proc_cpu_s  # benchmarks/ is on the path when a script in it runs

REPO = Path(__file__).resolve().parent.parent
READY = "Ctrl-C to stop"
RESERVED_PORT = 2024  # the workplace listens here: never touch it
SCRAPES_PER_S = 10
CASES = ("i1", "i0.1", "metrics", "quiet", "stuck")


def free_port(after: int = 0) -> int:
    """A free loopback port below the ephemeral range (never 2024)."""
    start = max(after + 1, 20000 + (time.monotonic_ns() // 1000) % 10000)
    for port in range(start, 32768):
        if port == RESERVED_PORT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def start(args: list[str], out) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tcptrace", *args],
        stdout=out,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    head = ""
    deadline = time.monotonic() + 60
    fd = proc.stderr.fileno()
    while READY not in head:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"tcptrace did not start: {head}")
        if select.select([fd], [], [], 1)[0]:
            head += os.read(fd, 4096).decode()
    return proc


class Scraper(threading.Thread):
    """curl on /metrics, SCRAPES_PER_S times a second, until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.done = threading.Event()
        self.scrapes = 0
        self.failed = 0

    def run(self) -> None:
        period = 1 / SCRAPES_PER_S
        next_at = time.monotonic()
        while not self.done.is_set():
            code = subprocess.call(
                ["curl", "-s", "-f", "-o", "/dev/null", self.url], stdout=subprocess.DEVNULL
            )
            self.scrapes += 1
            self.failed += code != 0
            next_at += period
            self.done.wait(max(0.0, next_at - time.monotonic()))


def strace_counts(pid: int, seconds: float) -> tuple[int, int]:
    """(all system calls, bpf calls) of every thread of pid during `seconds`."""
    with tempfile.NamedTemporaryFile("r", suffix=".strace") as report:
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-p", str(pid), "-o", report.name],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(seconds)
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=30)
        text = Path(report.name).read_text()
    total = bpf = 0
    for line in text.splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and re.fullmatch(r"\d+", fields[3]):
            if fields[-1] == "total":
                total = int(fields[3])
            elif fields[-1] == "bpf":
                bpf = int(fields[3])
    return total, bpf


def measure(case: str, seconds: float, strace_seconds: float, settle: float) -> dict:
    port = free_port()
    args = ["-p", str(port)]
    scraper = None
    if case == "metrics":
        metrics = free_port(port)
        args += ["--quiet", "--metrics", str(metrics)]
    elif case == "quiet":
        args += ["--quiet"]
    elif case == "stuck":
        args += ["--stuck", "CLOSE_WAIT=60s"]
    else:
        args += ["-i", case[1:]]
    with tempfile.TemporaryFile("w") as out:
        proc = start(args, out)
        try:
            if case == "metrics":
                scraper = Scraper(metrics)
                scraper.start()
            time.sleep(settle)
            before, t0 = proc_cpu_s(proc.pid), time.monotonic()
            time.sleep(seconds)
            cpu = (proc_cpu_s(proc.pid) - before) / (time.monotonic() - t0)
            calls, bpf = strace_counts(proc.pid, strace_seconds)
        finally:
            if scraper is not None:
                scraper.done.set()
                scraper.join()
            proc.send_signal(signal.SIGINT)
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    scale = 10 / strace_seconds
    result = {
        "case": case,
        "cpu_pct": 100 * cpu,
        "calls_10s": round(calls * scale),
        "bpf_10s": round(bpf * scale),
    }
    if scraper is not None:
        result["scrape_failures"] = scraper.failed
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", choices=CASES, help="default: every case")
    parser.add_argument("--seconds", type=float, default=30.0, help="CPU measured over (30)")
    parser.add_argument("--strace-seconds", type=float, default=10.0, help="strace for (10)")
    parser.add_argument("--settle", type=float, default=3.0, help="after start, before (3)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every case (1)")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: tcptrace loads BPF, strace attaches to it")
    cases = opts.case or list(CASES)
    print(f"{'case':<10} {'CPU %':>7} {'syscalls/10s':>13} {'bpf()/10s':>10}")
    for _round in range(opts.repeat):
        for case in cases:
            r = measure(case, opts.seconds, opts.strace_seconds, opts.settle)
            note = f"  ({r['scrape_failures']} scrapes failed)" if r.get("scrape_failures") else ""
            print(
                f"{r['case']:<10} {r['cpu_pct']:>7.2f} {r['calls_10s']:>13,} "
                f"{r['bpf_10s']:>10,}{note}",
                flush=True,
            )


if __name__ == "__main__":
    main()
