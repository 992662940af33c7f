#!/usr/bin/env python3
"""How many TIME_WAITs tcptrace follows, and at what cost, as the rate of active
closes grows (issue 21.4: every one up to at least 5,000 new a second on 2 cores).

Run as root from the repository, with the venv's Python (bcc must import):

    .venv/bin/python benchmarks/timewait.py                  # 300, 1,000, 5,000 a second, 20 s
    .venv/bin/python benchmarks/timewait.py --rates 5000 --seconds 30

For each rate, in a fresh network namespace (unshare -n, loopback up; its own
timewait table), client processes connect to servers on ADDRESSES loopback
addresses (so that the ports of one address do not run out) and close first;
the servers close at EOF: every client socket goes FIN_WAIT2 -> TIME_WAIT and
stays there the kernel's 60 s, longer than a run. tcptrace (-p PORT -n, its output
to a file, read as it comes) traces them. Reported per rate:

- the rate the workload reached, and the namespace's TIME_WAIT count at its end
  (/proc/net/sockstat `tw`, the kernel's own);
- the FIN_WAIT2 -> TIME_WAIT lines tcptrace printed, its FIN_WAIT2 -> CLOSE lines
  and its "not followed" count;
- tcptrace's CPU (utime + stime, % of one CPU over the run) and peak RSS.

This script is not part of the tcptrace package.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# benchmarks/ is on the path when a script in it runs: one definition of each
from churn import proc_cpu_s, proc_hwm_mb
from idle import free_port

REPO = Path(__file__).resolve().parent.parent
READY = "Ctrl-C to stop"
ADDRESSES = 8  # 127.0.0.1 .. 127.0.0.8: about 28,000 client ports each


def serve(port: int, ready) -> None:
    """One epoll server on every address: accepts, and closes each at its EOF."""
    sel = selectors.DefaultSelector()
    for i in range(ADDRESSES):
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((f"127.0.0.{i + 1}", port))
        srv.listen(4096)
        srv.setblocking(False)
        sel.register(srv, selectors.EVENT_READ, "listener")
    ready.set()
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if key.data == "listener":
                while True:
                    try:
                        conn, _ = sock.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
            else:
                try:
                    data = sock.recv(16)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    sock.close()


def connect_and_close(port: int, count: int, rate: float, first: int, out) -> None:
    started, done = time.monotonic(), 0
    for i in range(count):
        address = f"127.0.0.{(first + i) % ADDRESSES + 1}"
        try:
            socket.create_connection((address, port)).close()
            done += 1
        except OSError:
            pass
        ahead = started + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    out.put(done)


def workload(port: int, rate: float, seconds: float, procs: int) -> None:
    """Runs inside the namespace: prints {"connections", "seconds", "tw"} as JSON."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    ready = mp.Event()
    server = mp.Process(target=serve, args=(port, ready), daemon=True)
    server.start()
    ready.wait()
    results = mp.Queue()
    per = int(rate * seconds / procs)
    clients = [
        mp.Process(target=connect_and_close, args=(port, per, rate / procs, i, results))
        for i in range(procs)
    ]
    started = time.monotonic()
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    elapsed = time.monotonic() - started
    connections = sum(results.get() for _ in clients)
    time.sleep(1.0)  # the last peers' FINs
    sockstat = Path("/proc/net/sockstat").read_text()
    tw = int(re.search(r"\btw (\d+)", sockstat).group(1))
    server.terminate()
    print(json.dumps({"connections": connections, "seconds": elapsed, "tw": tw}))


def run_rate(rate: float, seconds: float, procs: int, workdir: Path) -> dict:
    port = free_port()
    out_path, err_path = workdir / f"out-{rate:g}.txt", workdir / f"err-{rate:g}.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        tracer = subprocess.Popen(
            [sys.executable, "-m", "tcptrace", "-p", str(port), "-n", "-T", "none"],
            stdout=out,
            stderr=err,
            cwd=REPO,
        )
    deadline = time.monotonic() + 120
    while READY not in err_path.read_text():
        if tracer.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"tcptrace did not start: {err_path.read_text()}")
        time.sleep(0.1)
    cpu_before = proc_cpu_s(tracer.pid)
    started = time.monotonic()
    workload_args = [str(port), str(rate), str(seconds), str(procs)]
    done = subprocess.run(
        ["unshare", "-n", sys.executable, __file__, "--workload", *workload_args],
        capture_output=True,
        text=True,
        check=True,
    )
    time.sleep(1.0)  # the reader's last batches and polls
    cpu = proc_cpu_s(tracer.pid) - cpu_before
    wall = time.monotonic() - started
    rss = proc_hwm_mb(tracer.pid)
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=120)
    made = json.loads(done.stdout)
    text = out_path.read_text()
    unfollowed = re.search(r"TIME_WAIT: (\d+) closing sockets not followed", text)
    lost = re.search(r"(\d+) transitions traced, (\d+) shown, (\d+) lost", text)
    held = re.search(r"(\d+) held: still in FIN_WAIT2", text)
    return {
        "rate": rate,
        "reached": made["connections"] / made["seconds"],
        "connections": made["connections"],
        "kernel_tw": made["tw"],
        "to_tw": text.count("FIN_WAIT2 -> TIME_WAIT") + text.count("CLOSING -> TIME_WAIT"),
        "tw_ended": text.count("TIME_WAIT -> CLOSE"),
        "fw2_to_close": text.count("FIN_WAIT2 -> CLOSE") + text.count("CLOSING -> CLOSE"),
        "held": int(held.group(1)) if held else 0,
        "unfollowed": int(unfollowed.group(1)) if unfollowed else 0,
        "lost": int(lost.group(3)) if lost else None,
        "cpu_percent": 100 * cpu / wall,
        "peak_rss_mb": rss,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--workload":
        port, rate, seconds, procs = sys.argv[2:6]
        workload(int(port), float(rate), float(seconds), int(procs))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="300,1000,5000")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tcptrace-tw-") as tmp:
        for rate in (float(r) for r in args.rates.split(",")):
            rows.append(run_rate(rate, args.seconds, args.procs, Path(tmp)))
            r = rows[-1]
            print(
                f"{r['rate']:>6g}/s asked, {r['reached']:,.0f}/s reached, "
                f"{r['connections']:,} connections; kernel tw {r['kernel_tw']:,}; "
                f"-> TIME_WAIT {r['to_tw']:,} (ended {r['tw_ended']:,}, so "
                f"{r['to_tw'] - r['tw_ended']:,} left), held in FIN_WAIT2 {r['held']:,}, "
                f"FIN_WAIT2/CLOSING -> CLOSE {r['fw2_to_close']:,}, "
                f"not followed {r['unfollowed']:,}, lost {r['lost']}; "
                f"tcptrace CPU {r['cpu_percent']:.1f}% of one, peak RSS {r['peak_rss_mb']:.0f} MB",
                flush=True,
            )


if __name__ == "__main__":
    main()
