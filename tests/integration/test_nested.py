"""Nothing skipped: a transition the kernel does not run the tracepoint program for
(while a BPF program already runs on that CPU, and a softirq makes the transition)
is handled by tcptrace's nested raw-tracepoint program in its place.

Another, slow tracing program on the same tracepoint makes such skips certain: while
it runs, every perf-tracepoint program there is skipped for the hits that interrupt
it. Before the nested program, these bursts under it lost 1.6% of their transitions
("up to 1164 transitions were never seen").
"""

from __future__ import annotations

import ctypes
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tcptrace.kernel.btf import SockOffsets, sock_offsets
from tcptrace.kernel.loader import CHECK_ARMED, CHECK_SERVER, RAW_TRACEPOINT, Probe, ProbeConfig

from . import massclose
from .accounting import (
    UNCOUNTED_MISS_BOUND,
    UNEXPLAINED_SHORTFALL,
    kernel_counts_misses,
    missed,
)
from .cmd import Running
from .netutil import free_port

pytestmark = pytest.mark.usefixtures("bpf_ready")

SLOW_TRACER = Path(__file__).with_name("slow_tracer.py")
ROUNDS = 5
COUNT = 1500
# --quiet's last line: 'N transitions traced, L lost'
QUIET_SUMMARY = re.compile(r"^(\d+) transitions traced, (\d+) lost", re.MULTILINE)
# The summary's TIME_WAIT row: how many left it (only ever learnt by polling)
TIME_WAIT_ROW = re.compile(r"^TIME_WAIT +(\d+) ", re.MULTILINE)


def test_transitions_skipped_while_another_program_runs_are_all_traced():
    slow = subprocess.Popen([sys.executable, str(SLOW_TRACER)], stdout=subprocess.PIPE, text=True)
    try:
        assert slow.stdout.readline().strip() == "ready"
        port = free_port()
        run = Running("--port", str(port), "-q")
        run.wait_ready()
        churn = massclose.run_in_netns(port, ROUNDS, COUNT)
        made = int(churn.communicate(timeout=300)[0])
        assert churn.returncode == 0 and made == ROUNDS * COUNT
        time.sleep(0.3)
        code, out, err = run.stop(signal.SIGINT)
    finally:
        slow.send_signal(signal.SIGTERM)
        slow_out = slow.communicate(timeout=30)[0]
    assert code == 0, err
    expected = made * massclose.TRANSITIONS_PER_CONNECTION + ROUNDS * massclose.LISTENER_TRANSITIONS
    traced, lost = map(int, QUIET_SUMMARY.findall(out)[-1])
    # the TIME_WAIT -> CLOSE transitions learnt by polling (a 4-tuple reused, tcp_tw_reuse)
    # are counted traced too, and the kernel never made them: in the emulated VM's
    # slower rounds, 1,061 of them once
    polled = TIME_WAIT_ROW.findall(out)
    traced -= int(polled[-1]) if polled else 0
    summary = (out.splitlines()[-1], err)
    # the bound the accounting tests allow for a shortfall no counter explains (here
    # also for a hit counted twice: its two programs more than PENDING_NS apart)
    slack = int(expected * UNEXPLAINED_SHORTFALL)
    assert traced <= expected + slack and lost == 0, summary
    if kernel_counts_misses():
        # the slow program was skipped too: the skips this test is about happened;
        # before the nested program about as many transitions were never seen
        skipped = int(slow_out.split()[-1])
        assert skipped > 0, slow_out
        assert expected - traced <= max(slack, skipped // 4), summary
        # an upper bound: hits skipped for the nested program too (most were taken)
        assert missed(err) <= max(slack, skipped // 4), summary
    else:
        assert expected - traced <= expected * UNCOUNTED_MISS_BOUND, summary


def test_offsets_that_misread_the_check_connection_leave_the_nested_program_out():
    probe = Probe(ProbeConfig(emit_events=False))
    try:
        assert probe.check_nested() is None
        assert RAW_TRACEPOINT in probe.bpf.raw_tracepoint_fds
    finally:
        probe.close()
    right = sock_offsets().offsets
    # the local port read two bytes off: the check connection's ports come out wrong
    wrong = SockOffsets({**right, "INET_SPORT_OFFSET": right["INET_SPORT_OFFSET"] + 2})
    probe = Probe(ProbeConfig(emit_events=False, sock_offsets=wrong))
    try:
        problem = probe.check_nested()
        assert problem is not None and problem.startswith("the BTF offsets read"), problem
        assert RAW_TRACEPOINT not in probe.bpf.raw_tracepoint_fds
    finally:
        probe.close()


def test_a_check_connection_of_another_port_is_not_taken_for_ours():
    """Two tracers started together check at the same time: each must note only its
    own check connection (the VM's slow start made two tracers' checks overlap, and
    one tracer took the other's connection for its own and left its program out)."""
    probe = Probe(ProbeConfig(emit_events=False))
    try:
        assert probe.check_nested() is None
        ends = probe.bpf[b"check_ends"]
        for slot in range(len(ends)):
            ends[ctypes.c_int(slot)] = ends.Leaf()
        with socket.socket() as server:
            server.bind((CHECK_SERVER, 0))
            server.listen(1)
            # armed as while checking, with a port of its own: this connection is
            # another tracer's check
            armed_with = server.getsockname()[1] + 1
            probe.bpf[b"self_check"][ctypes.c_int(CHECK_ARMED)] = ctypes.c_uint32(armed_with)
            try:
                with socket.create_connection(server.getsockname()), server.accept()[0]:
                    time.sleep(0.05)
            finally:
                probe.bpf[b"self_check"][ctypes.c_int(CHECK_ARMED)] = ctypes.c_uint32(0)
        assert not any(any(bytes(ends[ctypes.c_int(s)])) for s in range(len(ends)))
    finally:
        probe.close()


def test_without_btf_skipped_transitions_are_only_counted_and_it_says_so():
    port = free_port()
    run = Running("--port", str(port), "-q", env={"TCPTRACE_BTF": "/nonexistent/btf"})
    run.wait_ready()
    code, out, err = run.stop(signal.SIGINT)
    assert code == 0, err
    (line,) = [line for line in err.splitlines() if "only counted, not traced" in line]
    assert line.startswith("tcptrace: transitions the kernel skips") and "no usable BTF" in line
    assert QUIET_SUMMARY.search(out), out


def test_a_start_parses_the_kernels_btf_once(monkeypatch):
    # every offset (namespace, the nested program's, the map scan's) from one parse:
    # it takes seconds under emulation, where each start paid it three times
    from tcptrace.kernel import btf as btf_module

    loads = []
    real_load = btf_module.Btf.load.__func__

    def counting_load(cls, path=None):
        loads.append(path)
        return real_load(cls, path)

    monkeypatch.setattr(btf_module.Btf, "load", classmethod(counting_load))
    probe = Probe(ProbeConfig(emit_events=False, keep_ends=True, scan=True))
    try:
        assert probe.open_scan() is None
        assert probe.netns_problem is None and probe.nested_problem is None
    finally:
        probe.close()
    assert len(loads) == 1, loads
