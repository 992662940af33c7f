#!/usr/bin/env python3
"""What finding stuck sockets costs with many tracked sockets (issue: at most 2% of one
CPU with 65,536 tracked sockets).

Run as root from the repository, with the venv's Python (bcc must import):

    .venv/bin/python benchmarks/scan.py                 # 65,536 sockets, 20 s
    .venv/bin/python benchmarks/scan.py --sockets 16384 --seconds 10

In a fresh network namespace (unshare -n, loopback up) it starts `tcptrace --stuck`
on two ports, then opens sockets/2 loopback connections to them (both ends held, so
sockets/2 ESTABLISHED pairs) and measures:

1. tcptrace's own CPU (utime + stime from /proc) while it watches them, idle
   otherwise: the whole cost of --stuck, scans every second included;
2. one scan of the kernel's per-socket map, two ways, from this process:
   tcptrace's scan (the kernel's walk, a BPF iterator; where the kernel refuses
   it, tcptrace's walk in user space) and a bare batch read of the whole map
   into Python (BPF_MAP_LOOKUP_BATCH, then decoding every entry).

This script is not part of the tcptrace package.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY = "Ctrl-C to stop"
PORT_BASE = 18080  # holders listen from here up: below the ephemeral range, in our namespace
MAX_HOLDERS = 64
PORTS = f"{PORT_BASE}-{PORT_BASE + MAX_HOLDERS - 1}"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


# Connections per holder process: both ends open, within the open-files limit.
PAIRS_PER_HOLDER = 8192


def _hold(port: int, pairs: int, ready, done) -> None:
    """A holder process: a listener on `port`, `pairs` connections to it, all kept."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(4096)
    held = [ls]
    for _ in range(pairs):
        c = socket.create_connection(("127.0.0.1", port))
        a, _ = ls.accept()
        held += [c, a]
    ready.set()
    done.wait()


class Held:
    """sockets/2 loopback connections with both ends open, spread over processes (the
    open-files limit is per process)."""

    def __init__(self, sockets: int) -> None:
        import multiprocessing

        pairs = sockets // 2
        self.done = multiprocessing.Event()
        self.workers = []
        for i, start in enumerate(range(0, pairs, PAIRS_PER_HOLDER)):
            ready = multiprocessing.Event()
            n = min(PAIRS_PER_HOLDER, pairs - start)
            w = multiprocessing.Process(target=_hold, args=(PORT_BASE + i, n, ready, self.done))
            w.start()
            ready.wait(120)
            self.workers.append(w)

    def close(self) -> None:
        self.done.set()
        for w in self.workers:
            w.join(30)


def map_scans(rounds: int) -> dict[str, float]:
    """CPU ms per scan: the kernel's walk against a batch read decoded in Python."""
    sys.path.insert(0, str(REPO))
    from bcc.libbcc import lib

    from tcptrace.filters import Filters
    from tcptrace.kernel.loader import Probe, ProbeConfig

    ports = frozenset(range(PORT_BASE, PORT_BASE + MAX_HOLDERS))
    probe = Probe(
        ProbeConfig(
            filters=Filters(ports=ports),
            emit_events=False,
            keep_ends=True,
            scan=True,
            stuck_ns={8: 10**9},
            max_sockets=1 << 17,
        )
    )
    try:
        assert probe.open_scan() is None
        held = Held(ARGS.sockets)
        table = probe.bpf[b"sockets"]
        entries = probe.sockets_tracked()
        t = time.process_time()
        for _ in range(rounds):
            probe.scan(time.monotonic_ns())
        kernel_ms = (time.process_time() - t) * 1000 / rounds  # tcptrace's scan
        key_size, value_size = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
        value = struct.Struct(f"=QQII16sII{value_size - 48}x")
        t = time.process_time()
        for _ in range(rounds):
            keys = ctypes.create_string_buffer(key_size * entries)
            values = ctypes.create_string_buffer(value_size * entries)
            count, out_batch = ctypes.c_uint32(entries), ctypes.c_uint32(0)
            lib.bpf_lookup_batch(
                table.map_fd, None, ctypes.byref(out_batch), keys, values, ctypes.byref(count)
            )
            now = time.monotonic_ns()
            oldest: dict[int, int] = {}
            for ts, _cg, _pid, _flags, _comm, state, _netns in value.iter_unpack(
                values.raw[: value_size * count.value]
            ):
                if now - ts > 10**9 or ts < oldest.get(state, now):
                    oldest[state] = ts
        batch_ms = (time.process_time() - t) * 1000 / rounds
        held.close()
        # where the kernel refuses the iterator, tcptrace's scan is its user-space walk
        walk = "user space" if probe.scan_fallback else "kernel"
        return {"entries": entries, "walk": walk, "tcptrace_scan_ms": kernel_ms,
                "batch_read_ms": batch_ms}  # fmt: skip
    finally:
        probe.close()


def watch_cost() -> dict[str, float]:
    """tcptrace --stuck's CPU while it watches the held sockets."""
    tracer = subprocess.Popen(
        [sys.executable, "-m", "tcptrace", "--stuck", "CLOSE_WAIT=1s,SYN_SENT=1s", "-p", PORTS,
         "--max-sockets", str(1 << 17)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    head = ""
    while READY not in head:
        line = tracer.stderr.readline()
        if not line:
            raise SystemExit(f"tcptrace did not start: {head}")
        head += line
    held = Held(ARGS.sockets)
    time.sleep(2)  # the burst of connects is over
    before, t0 = cpu_seconds(tracer.pid), time.monotonic()
    time.sleep(ARGS.seconds)
    used, wall = cpu_seconds(tracer.pid) - before, time.monotonic() - t0
    tracer.send_signal(2)
    tracer.wait(30)
    held.close()
    return {"tcptrace_cpu_percent": 100 * used / wall, "seconds": wall}


def main() -> None:
    if os.environ.get("TCPTRACE_SCAN_NETNS") != "1":
        # again, alone in a fresh namespace: our ports, no other traffic
        env = {**os.environ, "TCPTRACE_SCAN_NETNS": "1"}
        script = 'ip link set lo up && exec "$0" "$@"'
        cmd = ["unshare", "--net", "sh", "-c", script, sys.executable, __file__, *sys.argv[1:]]
        raise SystemExit(subprocess.call(cmd, env=env))
    result = {"sockets": ARGS.sockets, **watch_cost(), **map_scans(ARGS.rounds)}
    print(
        f"{result['sockets']} sockets held ({result['entries']} in the kernel's map):\n"
        f"  tcptrace --stuck: {result['tcptrace_cpu_percent']:.2f}% of one CPU "
        f"over {result['seconds']:.0f} s\n"
        f"  one scan as tcptrace does it ({result['walk']} walk): "
        f"{result['tcptrace_scan_ms']:.1f} ms CPU\n"
        f"  one scan, batch read into Python and decode: {result['batch_read_ms']:.1f} ms CPU"
    )
    if ARGS.json_out:
        ARGS.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sockets", type=int, default=65536, help="tracked sockets (pairs x 2)")
    ap.add_argument("--seconds", type=float, default=20, help="how long to watch them")
    ap.add_argument("--rounds", type=int, default=20, help="scans timed each way")
    ap.add_argument("--json-out", type=Path)
    ARGS = ap.parse_args()
    main()
