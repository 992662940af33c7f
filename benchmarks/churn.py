#!/usr/bin/env python3
"""Connection-churn benchmark: tcptrace against no tracer and against bcc's tcpstates.

Run as root from the repository (bcc must import: use .venv/bin/python):

    .venv/bin/python benchmarks/churn.py                  # both regimes, every mode, 15 s each
    .venv/bin/python benchmarks/churn.py --seconds 60 --regime standard
    .venv/bin/python benchmarks/churn.py --mode json="--json"   # add a tcptrace mode
    .venv/bin/python benchmarks/churn.py --memory --startup --latency

Each run gets a fresh network namespace (loopback up; for the "fastest" regime
net.ipv4.tcp_max_tw_buckets=0 inside it), a compiled churn generator
(benchmarks/churn.c: client threads connect() and close(), server threads accept()
and close()) and, for traced modes, the tracer started inside the namespace.

The events the kernel produced are counted independently by a tiny BPF counter
on the same tracepoint (only the benchmark's port), attached for every run but
the bare "untraced" one; the "counter" row shows what that counter alone costs.
It also counts the connections that ended (a socket's close, listeners' aside):
the "lifetime" mode (tcptrace --lifetime) must print each one, or count it lost
(in the standard regime the active closer's side is still in TIME_WAIT at exit,
which tcptrace counts too).
Ratios are to the bare untraced rate of the same regime, measured in the same
invocation, so traced rows carry the counter's cost too (the figures are
conservative).

This script is not part of the tcptrace package: it loads its own counter with
bcc directly.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tcptrace-bench"
TCPSTATES = ("/usr/sbin/tcpstates-bpfcc", "/usr/share/bcc/tools/tcpstates")
# libbpf-tools' C tcpstates (Debian: libbpf-tools): unfiltered, as its -L and -D are ANDed
LIBBPF_TCPSTATES = "/usr/sbin/tcpstates"
CLONE_NEWNET = 0x40000000
RESERVED_PORT = 2024  # the workplace's port: never used
READY = "Ctrl-C to stop"
# where a mode's --write file goes: replaced by a path in the run's directory
CAPTURE = "{capture}"
REGIMES = {
    "standard": {},
    "fastest": {"net.ipv4.tcp_max_tw_buckets": "0"},
}

# A raw tracepoint program: a perf-tracepoint one is skipped for the hits made while
# another BPF program runs on the CPU (tcptrace's own or the tracers compared), which
# tcptrace traces anyway (README: "Transitions the kernel skips"). A raw one is only
# kept from running inside itself; its skips are counted (Counter.missed). It reads
# the socket at offsets from the running kernel's BTF, as tcptrace does.
COUNTER_SRC = r"""
BPF_PERCPU_ARRAY(hits, u64, 2);
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    u64 sk = ctx->args[0];
    int old = ctx->args[1], new = ctx->args[2];
    u16 protocol = 0, sport = 0, dport = 0;
    bpf_probe_read_kernel(&protocol, 2, (void *)(sk + SK_PROTOCOL_OFFSET));
    bpf_probe_read_kernel(&sport, 2, (void *)(sk + INET_SPORT_OFFSET));
    bpf_probe_read_kernel(&dport, 2, (void *)(sk + SK_DPORT_OFFSET));
    if (protocol != 6 || (bpf_ntohs(sport) != BENCH_PORT && bpf_ntohs(dport) != BENCH_PORT))
        return 0;
    int zero = 0;
    u64 *v = hits.lookup(&zero);
    if (v)
        (*v)++;
    /* a connection's end: a socket's close that is not a listener's */
    if (new == 7 && old != 10) {
        int one = 1;
        v = hits.lookup(&one);
        if (v)
            (*v)++;
    }
    return 0;
}
"""


# --- the churn generator --------------------------------------------------------------


def build_churn() -> Path:
    """Compile benchmarks/churn.c once per content into the cache directory."""
    source = HERE / "churn.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = CACHE / f"churn-{digest}"
    if not binary.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", str(tmp), str(source)], check=True)
        tmp.rename(binary)
    return binary


# --- network namespaces ---------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


class Netns:
    """A fresh network namespace with loopback up and the regime's sysctls."""

    def __init__(self, sysctls: dict[str, str]) -> None:
        self.name = f"tcptrace-bench-{os.getpid()}-{random.randrange(1 << 30)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.path = f"/run/netns/{self.name}"
        self.run(["ip", "link", "set", "lo", "up"])
        for key, value in sysctls.items():
            self.run(["sysctl", "-q", "-w", f"{key}={value}"])

    def enter(self) -> None:
        """preexec_fn: move the child into the namespace (network only, mounts unchanged)."""
        fd = os.open(self.path, os.O_RDONLY)
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            os._exit(126)
        os.close(fd)

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, preexec_fn=self.enter, check=True, **kw)

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(cmd, preexec_fn=self.enter, **kw)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


# --- the independent counter ----------------------------------------------------------


class Counter:
    """Transitions on the benchmark's port, counted in the kernel by a separate program."""

    def __init__(self, port: int) -> None:
        from bcc import BPF

        from tcptrace.kernel.btf import sock_offsets

        cflags = [*sock_offsets().cflags(), f"-DBENCH_PORT={port}"]
        self.bpf = BPF(text=COUNTER_SRC, cflags=cflags)
        self.attached = True

    def value(self) -> int:
        return sum(self.bpf[b"hits"][ctypes.c_int(0)])

    def ended(self) -> int:
        """Connections that ended (closes of sockets other than listeners)."""
        return sum(self.bpf[b"hits"][ctypes.c_int(1)])

    def missed(self) -> int:
        """Hits the counter was skipped for (it was running, interrupted on its CPU)."""
        from bcc.libbcc import lib

        from tcptrace.kernel.loader import PROG_INFO_SIZE, RECURSION_MISSES_OFFSET

        info = ctypes.create_string_buffer(PROG_INFO_SIZE)
        size = ctypes.c_uint32(PROG_INFO_SIZE)
        (func,) = self.bpf.funcs.values()
        if lib.bpf_obj_get_info_by_fd(func.fd, info, ctypes.byref(size)) != 0:
            return 0
        at = RECURSION_MISSES_OFFSET
        return int.from_bytes(info.raw[at : at + 8], "little")

    def attach(self, on: bool) -> None:
        tp = b"inet_sock_set_state"
        fn = b"raw_tracepoint__inet_sock_set_state"
        if on and not self.attached:
            self.bpf.attach_raw_tracepoint(tp=tp, fn_name=fn)
        elif not on and self.attached:
            self.bpf.detach_raw_tracepoint(tp=tp)
        self.attached = on


# --- one measured run -----------------------------------------------------------------


@dataclass
class Mode:
    name: str
    kind: str  # "untraced", "counter", "tcptrace", "tcpstates", "busy"
    args: list[str] = field(default_factory=list)
    program: str = ""  # a tcpstates kind: this one instead of bcc's
    # a tcptrace kind with a part of its reader cut off (benchmarks/reader_parts.py)
    part: str = ""

    @property
    def counted(self) -> bool:
        """The independent counter is attached (not with the workload alone or busy)."""
        return self.kind not in ("untraced", "busy")


@dataclass
class Result:
    regime: str
    mode: str
    rate: float = 0.0
    connections: int = 0
    produced: int | None = None  # transitions counted by the independent counter
    ended: int | None = None  # connections ended, counted by the independent counter
    # hits the counter was skipped for (it ran, interrupted, on the CPU): it undercounts
    counter_skipped: int = 0
    waiting: int | None = None  # --lifetime: connections still in TIME_WAIT at exit
    seen: int | None = None  # tcptrace's own count of matching transitions
    printed: int | None = None
    faster: int | None = None  # with --slower-than: not submitted, faster than the threshold
    lost: int | None = None
    cpu_s: float | None = None  # consumer CPU while the churn ran
    cpu_pct: float | None = None
    rss_mb: float | None = None  # consumer peak RSS
    ready_s: float | None = None
    idle_pct: float | None = None  # the machine's idle CPU while the churn ran (all CPUs)
    note: str = ""


def cpu_times() -> tuple[int, int]:
    """(idle, total) jiffies of all CPUs together (/proc/stat), idle counting iowait."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # user..steal; guest is inside user


def idle_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    idle, total = after[0] - before[0], after[1] - before[1]
    return 100 * idle / total if total > 0 else 0.0


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def perf_fds(pid: int) -> int:
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == "anon_inode:[perf_event]":
                n += 1
        except OSError:
            pass
    return n


def wait_ready(proc: subprocess.Popen, kind: str, err_path: Path, timeout: float = 60) -> float:
    """Seconds from start until the tracer is attached and reading."""
    start = time.monotonic()
    deadline = start + timeout
    cpus = os.cpu_count() or 1
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited early: {err_path.read_text()[-2000:]}")
        if kind == "tcptrace":
            if READY in err_path.read_text():
                return time.monotonic() - start
        elif perf_fds(proc.pid) >= 1 + cpus:
            # attached, buffers open; give its loop a moment to start polling
            time.sleep(0.3)
            return time.monotonic() - start
        time.sleep(0.02)
    raise RuntimeError(f"{kind} did not start within {timeout} s")


# traced, shown (with --slower-than: "(slower than 1ms), F faster"), lost ("connections
# shown", "connections lost" with --lifetime: one record per connection)
SUMMARY_RE = re.compile(
    r"^(\d+) transitions traced(?:, (\d+)(?: connections)? shown(?: \(slower than [^)]*\))?)?"
    r"(?:, (\d+) faster)?, (\d+)(?: connections)? lost",
    re.M,
)
WAITING_RE = re.compile(r"^(\d+) connections still in TIME_WAIT at exit", re.M)
HELD_RE = re.compile(r", (\d+) held: still in FIN_WAIT2 at exit")
MISSED_RE = re.compile(r"up to (\d+) transitions were never seen")
DETAIL_RE = re.compile(r"lost \((\d+) shed, (\d+) dropped\)")
# bcc's Python tools, then libbpf-tools' C ones
TCPSTATES_LOST_RE = re.compile(r"Possibly lost (\d+) samples|lost (\d+) events on CPU")


# A process that keeps one CPU busy for a share of each 10 ms: what any consumer
# of that much CPU costs the workload, whatever it does with it.
BUSY_LOOP = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
share = float(sys.argv[1]) / 100
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < 0.01 * share:
        pass
    if share < 1:
        time.sleep(0.01 * (1 - share))
"""


def tracer_command(mode: Mode, port: int) -> list[str]:
    if mode.kind == "busy":
        return [sys.executable, "-c", BUSY_LOOP, *mode.args]
    if mode.kind == "tcptrace" and mode.part:
        parts = str(HERE / "reader_parts.py")
        return [sys.executable, parts, mode.part, "--port", str(port), *mode.args]
    if mode.kind == "tcptrace":
        return [sys.executable, "-m", "tcptrace", "--port", str(port), *mode.args]
    return [mode.program or find_tcpstates(), *mode.args]


def find_tcpstates() -> str:
    for path in TCPSTATES:
        if os.access(path, os.X_OK):
            return path
    return ""


def run_one(
    regime: str, mode: Mode, churn: Path, counter: Counter, port: int, args, workdir: Path
) -> Result:
    result = Result(regime, mode.name)
    ns = Netns(REGIMES[regime])
    tracer = None
    try:
        counter.attach(mode.counted)
        out_path = workdir / f"{regime}-{mode.name}.out"
        err_path = workdir / f"{regime}-{mode.name}.err"
        if mode.kind in ("tcptrace", "tcpstates"):
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            # --write's file: CAPTURE in the mode's arguments
            command = [a.replace(CAPTURE, str(capture_path(workdir, regime, mode)))
                       for a in tracer_command(mode, port)]  # fmt: skip
            with open(out_path, "w") as out, open(err_path, "w") as err:
                tracer = ns.popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
            result.ready_s = wait_ready(tracer, mode.kind, err_path)
        elif mode.kind == "busy":
            tracer = subprocess.Popen(tracer_command(mode, port))
        before, ended_before = counter.value(), counter.ended()
        skipped_before = counter.missed()
        cpu0 = proc_cpu_s(tracer.pid) if tracer else 0.0
        churn_cmd = [str(churn), "-p", str(port), "-d", str(args.seconds)]
        churn_cmd += ["-c", str(args.clients), "-s", str(args.servers)]
        times = cpu_times()
        done = ns.run(churn_cmd, capture_output=True, text=True).stdout
        result.idle_pct = idle_percent(times, cpu_times())
        fields = dict(kv.split("=") for kv in done.split())
        result.rate = float(fields["rate"])
        result.connections = int(fields["connections"])
        if tracer:
            # let the consumer drain what is still buffered before asking it to stop
            time.sleep(args.drain)
            result.cpu_s = proc_cpu_s(tracer.pid) - cpu0
            result.cpu_pct = 100 * result.cpu_s / (float(fields["seconds"]) + args.drain)
            result.rss_mb = proc_hwm_mb(tracer.pid)
            stop_tracer(tracer, result)
        if mode.counted:
            result.produced = counter.value() - before
            result.ended = counter.ended() - ended_before
            result.counter_skipped = counter.missed() - skipped_before
            if result.counter_skipped:
                result.note += f" the counter was skipped for {result.counter_skipped} hits;"
        if tracer and mode.kind != "busy":
            parse_tracer_output(mode, result, out_path, err_path, port)
    finally:
        if tracer and tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        ns.close()
    return result


def stop_tracer(tracer: subprocess.Popen, result: Result) -> None:
    """Ctrl-C, as a user would; a second one, then SIGKILL, if it does not stop."""
    for sig, wait in ((signal.SIGINT, 60), (signal.SIGINT, 10), (signal.SIGKILL, 10)):
        tracer.send_signal(sig)
        try:
            tracer.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            result.note += f" did not stop on {sig.name};"


def parse_json_summary(result: Result, text: str) -> bool:
    """--json output: a summary object last, one transition object a line before it."""
    tail = text.rstrip("\n").rsplit("\n", 1)[-1]
    if not tail.startswith("{"):
        return False
    summary = json.loads(tail)
    if summary.get("type") != "summary":
        return False
    result.seen = summary["transitions_traced"]
    result.printed = summary["written"]
    result.faster = summary.get("faster")
    result.lost = summary["lost"]
    lines = text.count('{"type":"transition"')
    if lines != result.printed:
        result.note += f" {lines} lines in the file"
    return True


def lifetime_lines(text: str) -> int:
    """Connections in a --lifetime text output: the lines before the summary's blank
    line, headers aside."""
    lines = text.split("\n\n", 1)[0].splitlines()
    return sum(1 for line in lines if not line.rstrip().endswith("LIFETIME  STATES"))


def check_lifetimes(result: Result, text: str, err: str) -> None:
    """Every connection that ended was printed, is still in TIME_WAIT, or was counted
    lost (or its close was never seen by the program: stderr says how many may be)."""
    waiting, held = WAITING_RE.search(text), HELD_RE.search(text)
    # (a socket held in FIN_WAIT2 at exit has not finished either)
    result.waiting = sum(int(m.group(1)) for m in (waiting, held) if m)
    if result.ended is None or result.printed is None or result.lost is None:
        return
    accounted = result.printed + result.waiting + result.lost
    # the counter may miss connection ends that tcptrace saw: as many as it was skipped for
    if not 0 <= accounted - result.ended <= result.counter_skipped:
        missed = MISSED_RE.search(err)
        result.note += (
            f" {result.ended} ended != {result.printed} printed + {result.waiting} "
            f"unfinished + {result.lost} lost"
            + (f" (up to {missed.group(1)} transitions never seen)" if missed else "")
            + ";"
        )


def capture_path(workdir: Path, regime: str, mode: Mode) -> Path:
    return workdir / f"{regime}-{mode.name.replace(' ', '_')}.cap"


def count_captured(path: Path) -> tuple[int, int]:
    """Transition records in a --write capture, and its bytes: read with tcptrace's
    reader (every file of a rotation), then deleted."""
    sys.path.insert(0, str(REPO))
    from tcptrace.kernel.capfile import EVENTS, open_captures
    from tcptrace.kernel.events import EVENT_SIZE

    files = sorted(path.parent.glob(path.name + "*"))
    records = 0
    with open_captures([str(f) for f in files]) as captures:
        for kind, payload in captures.records():
            if kind == EVENTS:
                records += len(payload) // EVENT_SIZE
    size = sum(f.stat().st_size for f in files)
    for f in files:
        f.unlink()
    return records, size


def parse_tracer_output(mode: Mode, result: Result, out_path: Path, err_path: Path, port: int):
    if mode.kind == "tcptrace" and CAPTURE in mode.args:
        # the summary on stderr, the transitions in the file: counted there
        found = SUMMARY_RE.findall(err_path.read_text(errors="replace"))
        if not found:
            result.note = "no summary line: " + err_path.read_text()[-300:]
            return
        seen, shown, _faster, lost = found[-1]
        result.seen, result.lost = int(seen), int(lost)
        records, size = count_captured(capture_path(out_path.parent, result.regime, mode))
        result.printed = records
        result.note += f" {size / max(records, 1):.1f} bytes a transition in the file;"
        if shown and int(shown) != records:
            result.note += f" {shown} shown but {records} in the file;"
        return
    if mode.kind == "tcptrace":
        text = out_path.read_text(errors="replace")
        if parse_json_summary(result, text):
            return
        found = SUMMARY_RE.findall(text)
        if not found:
            result.note = "no summary line: " + err_path.read_text()[-300:]
            return
        seen, shown, faster, lost = found[-1]
        detail = DETAIL_RE.search(text)
        if detail:
            result.note = f"{detail.group(1)} shed, {detail.group(2)} dropped"
        result.seen = int(seen)
        result.lost = int(lost)
        if faster:
            result.faster = int(faster)
        if mode.part:
            # (unformatted: "shown" counts the connections taken as far as the lines)
            result.printed = int(shown or 0) if not mode.part.startswith("read") else None
            result.note += " no lines written;"
            if result.printed is not None:
                check_lifetimes(result, text, err_path.read_text())
            return
        if shown:
            result.printed = int(shown)
            # cross-check the summary against the lines really written
            if "--lifetime" in mode.args:
                lines = lifetime_lines(text)
            else:
                lines = sum(1 for line in text.splitlines() if " -> " in line or '"new"' in line)
                lines -= 1  # the header
            if lines != result.printed:
                result.note += f" {lines} lines in the file"
        else:
            result.printed = 0
        if "--lifetime" in mode.args:
            check_lifetimes(result, text, err_path.read_text())
        return
    # tcpstates: count its lines for the benchmark's port (other traffic may be traced too)
    printed = 0
    needle = f" {port} "
    with open(out_path, errors="replace") as fh:
        for line in fh:
            if needle in line:
                printed += 1
    result.printed = printed
    result.lost = sum(
        int(bcc or libbpf) for bcc, libbpf in TCPSTATES_LOST_RE.findall(err_path.read_text())
    )


# --- the table ------------------------------------------------------------------------


def fmt(v, spec: str = ",") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def table(results: list[Result]) -> str:
    base = {r.regime: r.rate for r in results if r.mode == "untraced"}
    head = (
        "| regime | mode | conn/s | ratio | kernel transitions | tcptrace seen | printed "
        "| printed % | lost | consumer CPU | idle CPU | peak RSS | ready |"
    )
    rows = [head, "|" + "---|" * 13]
    for r in results:
        ratio = r.rate / base[r.regime] if base.get(r.regime) else None
        pct = None
        if r.waiting is not None and r.ended:
            # --lifetime prints connections: those that ended, less those in TIME_WAIT
            pct = 100 * r.printed / (r.ended - r.waiting) if r.ended > r.waiting else None
        elif r.printed is not None and r.produced:
            pct = 100 * r.printed / r.produced
        rows.append(
            f"| {r.regime} | {r.mode} | {r.rate:,.0f} | {fmt(ratio, '.2f')} "
            f"| {fmt(r.produced)} | {fmt(r.seen)} | {fmt(r.printed)} | {fmt(pct, '.1f')} "
            f"| {fmt(r.lost)} | {fmt(r.cpu_pct, '.0f')}{'%' if r.cpu_pct is not None else ''} "
            f"| {fmt(r.idle_pct, '.0f')}{'%' if r.idle_pct is not None else ''} "
            f"| {fmt(r.rss_mb, '.0f')}{' MB' if r.rss_mb is not None else ''} "
            f"| {fmt(r.ready_s, '.2f')}{' s' if r.ready_s is not None else ''} |"
            + (f" {r.faster:,} faster;" if r.faster is not None else "")
            + (f" {r.note}" if r.note else "")
        )
    return "\n".join(rows)


# --- memory, start-up, latency --------------------------------------------------------


def memory_run(churn: Path, counter: Counter, port: int, args, workdir: Path) -> str:
    """RSS of tcptrace (text to a file) after 100k and after 5M traced transitions."""
    ns = Netns(REGIMES["standard"])
    counter.attach(True)
    marks = [100_000, 1_000_000, 5_000_000]
    got: list[tuple[int, float]] = []
    out_path = workdir / "memory.out"
    err_path = workdir / "memory.err"
    tracer = None
    churn_proc = None
    try:
        with open(out_path, "w") as out, open(err_path, "w") as err:
            tracer = ns.popen(
                [sys.executable, "-m", "tcptrace", "--port", str(port)],
                stdout=out,
                stderr=err,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        wait_ready(tracer, "tcptrace", err_path)
        base = counter.value()
        churn_proc = ns.popen([str(churn), "-p", str(port), "-d", "600"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while marks and time.monotonic() < deadline:
            n = counter.value() - base
            if n >= marks[0]:
                got.append((n, rss_mb(tracer.pid)))
                marks.pop(0)
            time.sleep(0.05)
    finally:
        for proc in (churn_proc, tracer):
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        ns.close()
    lines = [f"after {n:>9,} transitions: RSS {mb:6.1f} MB" for n, mb in got]
    if len(got) >= 2:
        lines.append(f"growth from first to last: {100 * (got[-1][1] / got[0][1] - 1):+.1f}%")
    return "\n".join(lines)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


STARTUP_PROBE = r"""
import time, sys
t0 = time.monotonic()
import bcc
t1 = time.monotonic()
from tcptrace.kernel.loader import Probe, ProbeConfig
t2 = time.monotonic()
probe = Probe(ProbeConfig())
t3 = time.monotonic()
probe.close()
print(f"import bcc {t1 - t0:.3f} s, import tcptrace {t2 - t1:.3f} s, "
      f"compile+load+attach {t3 - t2:.3f} s")
"""


def startup_run(port: int, tries: int = 3) -> str:
    lines = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(tries):
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "tcptrace", "--port", str(port), "--quiet"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        proc.stderr.readline()
        ready = time.monotonic() - start
        proc.send_signal(signal.SIGINT)
        proc.wait()
        phases = subprocess.run(
            [sys.executable, "-c", STARTUP_PROBE], capture_output=True, text=True, env=env
        ).stdout.strip()
        lines.append(f"ready after {ready:.2f} s  ({phases})")
    return "\n".join(lines)


def latency_run(port: int, samples: int = 20) -> str:
    """Delay from a transition to its printed line at low rate (one connection at a time)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tcptrace",
            "--port",
            str(port),
            "-n",
            "-T",
            "none",
            "--state",
            "LISTEN",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        while READY not in proc.stderr.readline():
            pass
        proc.stdout.readline()  # header
        delays = []
        for _ in range(samples):
            srv = socket.socket()
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", port))
            start = time.monotonic()
            srv.listen(1)  # CLOSE -> LISTEN
            proc.stdout.readline()
            delays.append(time.monotonic() - start)
            srv.close()  # LISTEN -> CLOSE
            proc.stdout.readline()
            time.sleep(random.uniform(0.05, 0.2))
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    delays.sort()
    ms = [1000 * d for d in delays]
    return (
        f"{samples} transitions, one at a time: median {ms[len(ms) // 2]:.1f} ms, "
        f"max {ms[-1]:.1f} ms (poll interval 50 ms)"
    )


# --- main -----------------------------------------------------------------------------


def default_modes() -> list[Mode]:
    modes = [
        Mode("untraced", "untraced"),
        Mode("counter", "counter"),
        Mode("tcptrace text", "tcptrace"),
        Mode("tcptrace --quiet", "tcptrace", ["--quiet"]),
        # the raw records to a file (issue 24): what capture costs beside --quiet
        Mode("tcptrace --write", "tcptrace", ["--write", CAPTURE]),
        Mode("tcptrace --stuck 1s", "tcptrace", ["--stuck", "1s"]),
        # lines for the slow transitions only: the kernel counts the rest, never submits them
        Mode("tcptrace --slower-than 1ms", "tcptrace", ["--slower-than", "1ms"]),
        Mode("tcptrace lifetime", "tcptrace", ["--lifetime"]),
        # the same with a part of the reader cut off: what reading, and the rest, cost
        Mode("tcptrace read-only lifetime", "tcptrace", ["--lifetime"], part="read"),
        Mode("tcptrace unformatted lifetime", "tcptrace", ["--lifetime"], part="unformatted"),
        # every transition read from the rings, nothing decoded: the floor of any reader
        # of them, --write's included
        Mode("tcptrace transitions read-only", "tcptrace", [], part="read-events"),
    ]
    if find_tcpstates():
        modes.append(Mode("tcpstates", "tcpstates"))
    if os.access(LIBBPF_TCPSTATES, os.X_OK):
        modes.append(Mode("tcpstates (libbpf)", "tcpstates", program=LIBBPF_TCPSTATES))
    return modes


def short_name(mode: Mode) -> str:
    """What --only also accepts: "quiet" for "tcptrace --quiet", "slower" for
    "tcptrace --slower-than 1ms", "text", "read" for "tcptrace read-only lifetime",
    "tcpstates"."""
    words = mode.name.removeprefix("tcptrace ").split()
    return words[0].lstrip("-").split("-")[0] if words else mode.name


def selected(mode: Mode, only: list[str]) -> bool:
    return mode.name in only or short_name(mode) in only


def parse_mode(text: str) -> Mode:
    name, _, extra = text.partition("=")
    return Mode(f"tcptrace {name}", "tcptrace", extra.split())


def machine() -> str:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    return (
        f"{os.cpu_count()} CPUs ({cpu}), {int(mem) // 1024} MiB RAM, "
        f"kernel {os.uname().release}, Python {sys.version.split()[0]}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=15, help="churn per run (default 15)")
    ap.add_argument("--regime", choices=[*REGIMES, "both"], default="both")
    ap.add_argument(
        "--mode",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help='extra tcptrace mode, e.g. json="--json" (repeatable)',
    )
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        help='run only modes named so, in full or short ("quiet", "slower", "text")',
    )
    ap.add_argument(
        "--busy",
        action="append",
        default=[],
        type=int,
        metavar="PCT",
        help="also run the churn beside a busy loop using PCT%% of one CPU (repeatable)",
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="rounds over all modes; the median run is shown"
    )
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--drain", type=float, default=1.0, help="seconds to drain after the churn")
    ap.add_argument("--memory", action="store_true", help="RSS after 100k and 5M events")
    ap.add_argument("--startup", action="store_true", help="time to the tracing line")
    ap.add_argument("--latency", action="store_true", help="delay to print at low rate")
    ap.add_argument("--json-out", type=Path, help="also write the results as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the tracers' output files")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("churn.py: needs root (network namespaces, BPF)", file=sys.stderr)
        return 1

    port = random.choice([p for p in range(10000, 20000) if p != RESERVED_PORT])
    churn = build_churn()
    counter = Counter(port)
    modes = default_modes() + [parse_mode(m) for m in args.mode]
    if args.only:
        modes = [m for m in modes if selected(m, args.only) or m.name == "untraced"]
    modes += [Mode(f"busy loop {pct}%", "busy", [str(pct)]) for pct in args.busy]
    regimes = list(REGIMES) if args.regime == "both" else [args.regime]
    workdir = Path(tempfile.mkdtemp(prefix="tcptrace-bench-"))
    print(f"machine: {machine()}")
    print(
        f"churn: {args.clients} client + {args.servers} server threads, {args.seconds:g} s "
        f"per run, {args.repeat} round(s), port {port}, output files in {workdir}",
        flush=True,
    )
    runs: dict[tuple[str, str], list[Result]] = {}
    for regime in regimes:
        # rounds interleave the modes so that a slow spell of a shared machine hits all
        for rnd in range(args.repeat):
            for mode in modes:
                r = run_one(regime, mode, churn, counter, port, args, workdir)
                runs.setdefault((regime, mode.name), []).append(r)
                ended = "" if r.waiting is None else f"  ended {fmt(r.ended)}"
                print(
                    f"  {regime:8} #{rnd + 1} {mode.name:26} {r.rate:>9,.0f} conn/s  produced "
                    f"{fmt(r.produced):>10}  printed {fmt(r.printed):>10}  lost {fmt(r.lost)}  "
                    f"idle {fmt(r.idle_pct, '.0f')}%"
                    + (f"  faster {fmt(r.faster)}" if r.faster is not None else "")
                    + f"{ended}{'  ' + r.note if r.note else ''}",
                    flush=True,
                )
    # per mode, the run with the median rate
    results = [sorted(rs, key=lambda r: r.rate)[len(rs) // 2] for rs in runs.values()]
    print()
    print(table(results))
    extra = {}
    if args.memory:
        extra["memory"] = memory_run(churn, counter, port, args, workdir)
        print("\nmemory (tcptrace text to a file, standard regime):\n" + extra["memory"])
    if args.startup:
        extra["startup"] = startup_run(port)
        print("\nstart-up:\n" + extra["startup"])
    if args.latency:
        extra["latency"] = latency_run(port)
        print("\nlatency at low rate:\n" + extra["latency"])
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "results": [r.__dict__ for r in results],
                    "runs": [r.__dict__ for rs in runs.values() for r in rs],
                    **extra,
                },
                indent=1,
            )
        )
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
