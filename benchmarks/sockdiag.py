"""What a sock_diag row costs: tcptrace's SocketTable against pyroute2's own DiagSocket.

TIME_WAIT following and owner look-ups read the kernel's socket table through
sock_diag, within a budget of wall time; the cost of a row sets how many
sockets fit in it. This makes N timewait sockets in a fresh network namespace
(as root), then dumps them both ways, side by side, several rounds:

    .venv/bin/python benchmarks/sockdiag.py [--sockets N] [--rounds R]
"""

from __future__ import annotations

import argparse
import ctypes
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tcptrace.sockets.sockdiag import ALL_STATES, SocketTable

CLONE_NEWNET = 0x40000000


def fresh_namespace() -> None:
    """This process into a network namespace of its own: only our sockets in the table."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        sys.exit(f"sockdiag benchmark: unshare(CLONE_NEWNET): {ctypes.get_errno()} (run as root)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def make_timewait(n: int) -> None:
    """n connections closed by the client first: n timewait sockets for 60 s."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1024)
        addr = srv.getsockname()
        for _ in range(n):
            cli = socket.create_connection(addr)
            conn, _ = srv.accept()
            cli.close()
            conn.close()
    time.sleep(0.2)


def pyroute2_rows() -> int:
    from pyroute2 import DiagSocket

    with DiagSocket() as diag:
        diag.bind()
        return sum(
            len(diag.get_sock_stats(family=family, states=0xFFF))
            for family in (socket.AF_INET, socket.AF_INET6)
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sockets", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    fresh_namespace()
    make_timewait(args.sockets)
    table = SocketTable()
    timings: dict[str, list[float]] = {"pyroute2 DiagSocket": [], "tcptrace SocketTable": []}
    rows: dict[str, int] = {}
    for _ in range(args.rounds):  # interleaved: both see the same machine
        for name, dump in (
            ("pyroute2 DiagSocket", pyroute2_rows),
            ("tcptrace SocketTable", lambda: len(table.dump(ALL_STATES))),
        ):
            started = time.perf_counter()
            rows[name] = dump()
            timings[name].append(time.perf_counter() - started)
    table.close()
    print(f"{args.sockets:,} timewait sockets, {args.rounds} rounds, median of each")
    medians = {}
    for name, times in timings.items():
        medians[name] = statistics.median(times) / max(rows[name], 1) * 1e6
        print(f"  {name:<22} {rows[name]:>7,} rows  {medians[name]:6.1f} µs/row")
    ratio = medians["pyroute2 DiagSocket"] / medians["tcptrace SocketTable"]
    print(f"  SocketTable is {ratio:.1f}x faster a row")


if __name__ == "__main__":
    main()
