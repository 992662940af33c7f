"""Where the consumer's time goes: µs of CPU per event, step by step.

Replays churn-like perf records (ten transitions per connection, client ports
cycling through the ephemeral range, two CPUs' rings) through the real code
path: perfbuf.parse, struct unpacking into Events, the time sort, then the
stages tcptrace builds (owners, TIME_WAIT following, output to /dev/null).
No BPF and no root needed: the records are made here, laid out as the kernel
writes them.

    .venv/bin/python benchmarks/consumer.py [--events N] [--format text|json|csv] [--wide]
                                            [--lifetime]

--lifetime replays the same transitions through the per-connection path
(sockets/lifetimes builds each connection from its transitions, as it does
without the kernel's life records), one line or record per connection.

Events carry this process's network namespace and cgroup, as the kernel's do:
--wide adds the NETNS and CGROUP text columns (JSON and CSV always carry them).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tcptrace.filters import Filters
from tcptrace.kernel import perfbuf
from tcptrace.kernel.events import (
    EVENT_SIZE,
    EVENT_STRUCT,
    F_DELTA_KNOWN,
    F_OWNER_KNOWN,
    event_time,
    make_event,
)
from tcptrace.session import Options, build_stages
from tcptrace.sockets.sockdiag import SocketTables
from tcptrace.states import TcpState as S
from tcptrace.tracer import fewer_collections

PORT = 18400
NETNS = os.stat("/proc/self/ns/net").st_ino
CGROUP = 1  # the cgroup v2 root's id
LOOPBACK = socket.inet_aton("127.0.0.1").ljust(16, b"\0")
# (client side?, old, new) of one churned connection, in order
LIFE = (
    (True, S.CLOSE, S.SYN_SENT),
    (True, S.SYN_SENT, S.ESTABLISHED),
    (False, S.LISTEN, S.SYN_RECV),
    (False, S.SYN_RECV, S.ESTABLISHED),
    (True, S.ESTABLISHED, S.FIN_WAIT1),
    (False, S.ESTABLISHED, S.CLOSE_WAIT),
    (True, S.FIN_WAIT1, S.FIN_WAIT2),
    (False, S.CLOSE_WAIT, S.LAST_ACK),
    (True, S.FIN_WAIT2, S.CLOSE),
    (False, S.LAST_ACK, S.CLOSE),
)
RECORD = perfbuf.HEADER.pack(
    perfbuf.PERF_RECORD_SAMPLE, 0, perfbuf.record_size(EVENT_SIZE)
) + struct.pack("=I", perfbuf.record_size(EVENT_SIZE) - perfbuf.SAMPLE_PREFIX)
# The connection's two owners: processes that exist, as a traced server's and
# client's do (an owner that has exited makes tcptrace look the socket up).
OWNERS = {False: os.getppid(), True: os.getpid()}
PAD = bytes(perfbuf.record_size(EVENT_SIZE) - perfbuf.SAMPLE_PREFIX - EVENT_SIZE)


def rings(events: int, per_read: int) -> list[list[bytes]]:
    """Chunks as two CPUs' rings would hold them: a list of reads, two chunks each."""
    rng = random.Random(1)
    cpus: list[list[bytes]] = [[], []]
    ts = 1_000_000_000_000
    for n in range(events // len(LIFE)):
        cport = 32768 + n % 28000
        sk = 0xFFFF888800000000 + 4096 * (n % 5000)
        for client, old, new in LIFE:
            ts += rng.randint(500, 9000)
            sport, dport = (cport, PORT) if client else (PORT, cport)
            flags = F_OWNER_KNOWN | (F_DELTA_KNOWN if old not in (S.CLOSE, S.LISTEN) else 0)
            comm = (b"client" if client else b"server").ljust(16, b"\0")
            raw = EVENT_STRUCT.pack(
                ts, rng.randint(2_000, 900_000), sk + client, CGROUP,
                OWNERS[client], flags, NETNS, 0,
                LOOPBACK, LOOPBACK, sport, dport, socket.AF_INET, old, new, comm,
            )  # fmt: skip
            cpus[rng.randrange(2)].append(RECORD + raw + PAD)
    reads = []
    for start in range(0, max(len(c) for c in cpus), per_read):
        reads.append([b"".join(c[start : start + per_read]) for c in cpus])
    return reads


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--format", choices=("text", "json", "csv"), default="text")
    ap.add_argument("--batch", type=int, default=perfbuf.READ_RECORDS, help="records per ring read")
    ap.add_argument("--wide", action="store_true", help="text: the NETNS and CGROUP columns")
    ap.add_argument("--lifetime", action="store_true", help="one line per finished connection")
    args = ap.parse_args()
    reads = rings(args.events, args.batch)
    n = sum(len(chunk) for read in reads for chunk in read) // perfbuf.record_size(EVENT_SIZE)
    options = Options(
        filters=Filters(ports=frozenset({PORT})),
        format=args.format,
        wide=args.wide,
        lifetime=args.lifetime,
    )
    with open("/dev/null", "w") as out, SocketTables() as tables:
        stages = build_stages(options, out, io.StringIO(), None, tables)
        for stage in stages:
            stage.on_start()
        spent: dict[str, float] = {"parse": 0.0, "unpack": 0.0, "sort": 0.0}
        spent.update((type(s).__name__, 0.0) for s in stages)
        unpack = perfbuf.record_struct(EVENT_STRUCT).iter_unpack
        clock = time.process_time
        with fewer_collections():
            for read in reads:
                t0 = clock()
                runs = [run for chunk in read for run in perfbuf.parse(chunk, EVENT_SIZE).runs]
                t1 = clock()
                events = []
                for run in runs:
                    events.extend(map(make_event, unpack(run)))
                t2 = clock()
                events.sort(key=event_time)
                t3 = clock()
                spent["parse"] += t1 - t0
                spent["unpack"] += t2 - t1
                spent["sort"] += t3 - t2
                for stage in stages:
                    start = clock()
                    replaced = stage.on_events(events)
                    spent[type(stage).__name__] += clock() - start
                    if replaced is not None:
                        events = replaced
    total = sum(spent.values())
    mode = (", -w" if args.wide else "") + (", --lifetime" if args.lifetime else "")
    print(f"{n:,} events, {args.format}{mode}, {args.batch} records per ring read")
    for step, seconds in spent.items():
        print(f"  {step:14} {1e6 * seconds / n:6.2f} µs/event")
    print(f"  {'total':14} {1e6 * total / n:6.2f} µs/event ({n / total:,.0f} events/s on one CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
