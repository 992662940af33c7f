"""Another tracing program on sock:inet_sock_set_state, slow on purpose: while it runs
on a CPU, the kernel runs no other tracepoint program there, so a transition made by
a softirq that interrupts it is skipped for every perf-tracepoint program (recursion
protection). Run as a separate process; prints "ready" once attached and, when
stopped (SIGTERM or SIGINT), how many hits the kernel skipped for it ("missed N":
every perf-tracepoint program on this tracepoint was skipped with it).

    python slow_tracer.py
"""

from __future__ import annotations

import ctypes
import signal
import sys

from bcc import BPF
from bcc.libbcc import lib

from tcptrace.kernel.loader import PROG_INFO_SIZE, RECURSION_MISSES_OFFSET

# Each hit spins this many clock reads (a few µs): long enough for softirqs to land.
SPINS = 200

PROGRAM = """
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    u64 x = 0;
    for (int i = 0; i < SPINS; i++)
        x += bpf_ktime_get_ns();
    return x == 1;
}
"""


def main() -> None:
    bpf = BPF(text=PROGRAM, cflags=[f"-DSPINS={SPINS}"])
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    info = ctypes.create_string_buffer(PROG_INFO_SIZE)
    size = ctypes.c_uint32(PROG_INFO_SIZE)
    (func,) = bpf.funcs.values()
    assert lib.bpf_obj_get_info_by_fd(func.fd, info, ctypes.byref(size)) == 0
    at = RECURSION_MISSES_OFFSET
    print(f"missed {int.from_bytes(info.raw[at : at + 8], 'little')}", flush=True)
    bpf.cleanup()
    sys.exit(0)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
