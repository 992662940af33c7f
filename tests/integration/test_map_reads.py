"""The kernel's maps read in batches: how many bpf() calls a live frame's readings
make (a summary, the loss check, a scan), and the same numbers read either way.

Every bpf() call tcptrace makes goes through libbcc's functions (bcc's table API
and the loader's own calls alike); a counting shim in front of them counts the
calls per function. The counts are exact, not timings: the idle cost they stand
for is measured by benchmarks/idle.py (BENCHMARKS.md, eighth session).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import socket
import time

import pytest

from tcptrace.filters import Filters
from tcptrace.kernel.events import HIST_SLOTS, NCOUNTERS
from tcptrace.kernel.mapread import ENOTSUPP, MapReader
from tcptrace.kernel.stats import Summary
from tcptrace.states import NSTATES, TcpState

from .netutil import free_port

pytestmark = pytest.mark.usefixtures("bpf_ready")

# the maps a summary reads: hist, dsum, dmax, trans, counters
SUMMARY_MAPS = 5


class CountingLib:
    """libbcc, with a count of the calls of each of its functions."""

    def __init__(self, lib) -> None:
        self._lib = lib
        self.calls: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str):
        target = getattr(self._lib, name)
        if not callable(target):
            return target

        def counted(*args):
            self.calls[name] += 1
            return target(*args)

        return counted


class OldKernel(CountingLib):
    """libbcc on a kernel that refuses batch look-ups with `error` (before Linux 5.6:
    EINVAL, an unknown command; a map type without them: ENOTSUPP)."""

    def __init__(self, lib, error: int) -> None:
        super().__init__(lib)
        self.error = error

    def __getattr__(self, name: str):
        if name != "bpf_lookup_batch":
            return super().__getattr__(name)

        def refused(*_args):
            self.calls[name] += 1
            ctypes.set_errno(self.error)
            return -1

        return refused


@pytest.fixture
def counting(monkeypatch):
    """Every libbcc call counted, from bcc's tables and tcptrace's loader alike."""
    import bcc.libbcc
    import bcc.table

    shim = CountingLib(bcc.libbcc.lib)
    monkeypatch.setattr(bcc.libbcc, "lib", shim)
    monkeypatch.setattr(bcc.table, "lib", shim)
    return shim


def connections(port: int, n: int) -> None:
    """n loopback connections to port, opened and closed: every state's maps get entries."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(n)
        for _ in range(n):
            client = socket.create_connection(("127.0.0.1", port))
            child, _ = srv.accept()
            client.close()
            child.close()
    time.sleep(0.2)  # the last closes (FIN_WAIT2 -> CLOSE: the timewait socket's)


@pytest.fixture
def probe():
    """A probe as the live table and --quiet --metrics load it: maps only, and the scan."""
    from tcptrace.kernel.loader import Probe, ProbeConfig

    port = free_port()
    loaded = Probe(
        ProbeConfig(
            filters=Filters(ports=frozenset({port})),
            emit_events=False,
            keep_ends=True,
            scan=True,
        )
    )
    try:
        connections(port, 20)
        with socket.socket() as srv:  # and a listener with two connections still open
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", port))
            srv.listen(2)
            with contextlib.ExitStack() as held:
                for _ in range(2):
                    held.enter_context(socket.create_connection(("127.0.0.1", port)))
                    held.enter_context(srv.accept()[0])
                yield loaded
    finally:
        loaded.close()


def test_a_frames_readings_cost_a_few_bpf_calls_whatever_the_maps_size(counting, probe):
    # (counting first: the probe is loaded with the shim as its libbcc)
    from bcc.libbcc import lib

    if not hasattr(lib, "bpf_lookup_batch"):
        # the key-by-key reading is what the two tests below compare with the batches
        pytest.skip("this bcc (Debian 11's 0.18) has no batch look-up: maps are read by key")
    probe.summary()  # the first reading allocates the buffers: count the next ones
    counting.calls.clear()
    summary = probe.summary()
    assert summary.total_transitions >= 20 * 9  # it read real entries
    # one batch per map: not one call per key (6,874 keys, bcc's table API)
    assert counting.calls == {"bpf_lookup_batch": SUMMARY_MAPS}
    counting.calls.clear()
    probe.lost_so_far()  # every second, beside the frames
    assert counting.calls == {"bpf_lookup_batch": 1}
    assert probe.open_scan() is None
    counting.calls.clear()
    probe.scan(time.monotonic_ns())  # OLDEST and NOW: at most once a second
    # the kernel's iterator: set the scan's time, run it, read its result
    assert sum(counting.calls.values()) <= 3, counting.calls


def read_by_hand(probe, name: str, size: int, reduce=sum) -> list[int]:
    """A per-CPU map read key by key through bcc's table API, as before batches."""
    table = probe.bpf[name.encode()]
    values = [0] * size
    for key, leaf in table.items():
        values[key.value] = reduce(leaf)
    return values


def hist_by_hand(probe) -> list[int]:
    """The histogram read key by key through bcc's table API: a row per state."""
    values = [0] * (NSTATES * HIST_SLOTS)
    for key, per_cpu in probe.bpf[b"hist"].items():
        for row in per_cpu:
            for slot, n in enumerate(row.slots):
                values[key.value * HIST_SLOTS + slot] += n
    return values


@pytest.mark.parametrize("error", [errno.EINVAL, ENOTSUPP], ids=["EINVAL", "ENOTSUPP"])
def test_batched_and_key_by_key_readings_are_the_same_numbers(probe, error):
    from bcc.libbcc import lib

    from tcptrace.kernel.loader import LEVELS, fold_levels

    probe.detach()  # nothing changes from here: every reading must be the same
    batched = probe.summary()
    assert batched.total_transitions >= 20 * 9
    # bcc's table API, key by key, as tcptrace read the maps before
    by_hand = Summary.from_maps(
        hist=hist_by_hand(probe),
        dsum=read_by_hand(probe, "dsum", NSTATES),
        dmax=fold_levels(read_by_hand(probe, "dmax", NSTATES * LEVELS, max)),
        trans=read_by_hand(probe, "trans", NSTATES * NSTATES),
        counters=read_by_hand(probe, "counters", NCOUNTERS),
    )
    by_hand.lost = probe.lost
    assert batched == by_hand
    # a kernel that refuses batches: each map is read key by key from the first refusal
    old = OldKernel(lib, error)
    probe._maps = MapReader(old)
    assert probe.summary() == batched
    assert old.calls["bpf_lookup_batch"] == SUMMARY_MAPS
    old.calls.clear()
    assert probe.summary() == batched
    assert "bpf_lookup_batch" not in old.calls  # not asked again
    # one look-up per key: NSTATES rows of the histogram, NSTATES * (1 + LEVELS + NSTATES)
    # of the others, and the counters
    assert old.calls["bpf_lookup_elem"] == NSTATES * (2 + LEVELS + NSTATES) + NCOUNTERS


def test_the_socket_map_reads_the_same_entries_key_by_key(probe):
    # the user-space scan's read of the per-socket hash map (where the kernel refuses
    # iterators), on a kernel without batches: a walk of its keys instead
    from bcc.libbcc import lib

    def entries() -> list[tuple[int, bytes]]:
        addresses, raw, size = probe._map_values()
        return sorted((sk, raw[i * size : (i + 1) * size]) for i, sk in enumerate(addresses))

    probe.detach()
    batched = entries()
    assert len(batched) >= 5, "the listener and both ends of two connections"
    old = OldKernel(lib, errno.EINVAL)
    probe._maps = MapReader(old)
    assert entries() == batched
    assert old.calls["bpf_get_next_key"] == len(batched) + 1  # the last one: the end


def _keys(probe, name: bytes) -> set[int]:
    return {key.value for key in probe.bpf[name]}


def test_the_user_space_scan_reads_the_ages_map_and_it_follows_the_socket_map(
    counting, monkeypatch
):
    """Where the iterator is refused, the kernel keeps each socket's time and state in a
    map of their own (16 bytes, not the sk_info's 96) and the scan reads that: one batch,
    the same counts. Sockets born before the scan was opened are given to it."""
    from tcptrace.kernel.loader import Probe, ProbeConfig

    monkeypatch.setenv("TCPTRACE_MAP_SCAN", "user")
    port = free_port()
    probe = Probe(
        ProbeConfig(
            filters=Filters(ports=frozenset({port})),
            emit_events=False,
            keep_ends=True,
            scan=True,
            stuck_ns={int(TcpState.ESTABLISHED): 1},
        )
    )
    try:
        with socket.socket() as srv, contextlib.ExitStack() as held:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", port))
            srv.listen(8)
            for _ in range(3):  # before the scan opens: the kernel keeps no ages yet
                held.enter_context(socket.create_connection(("127.0.0.1", port)))
                held.enter_context(srv.accept()[0])
            assert probe.open_scan() is None
            assert probe.scan_fallback and probe._ages is not None
            for _ in range(2):  # after: the kernel writes their ages itself
                held.enter_context(socket.create_connection(("127.0.0.1", port)))
                held.enter_context(srv.accept()[0])
            time.sleep(0.05)
            assert _keys(probe, b"ages") == _keys(probe, b"sockets")
            counting.calls.clear()
            result = probe.scan(time.monotonic_ns())
            # 5 pairs and the listener, each once: from one batch of the ages map, the
            # reported sockets' ends from the socket map, one look-up each
            assert result.count == {int(TcpState.ESTABLISHED): 10, int(TcpState.LISTEN): 1}
            assert len(result.records) == 10
            assert all(port in (r.sport, r.dport) for r in result.records)
            from bcc.libbcc import lib

            if hasattr(lib, "bpf_lookup_batch"):  # (Debian 11's bcc walks the keys)
                assert counting.calls["bpf_lookup_batch"] == 1
                assert counting.calls["bpf_lookup_elem"] == 10
        time.sleep(0.2)  # every close done (the timewait sockets are not the map's)
        assert _keys(probe, b"ages") == _keys(probe, b"sockets") == set()
        assert probe.scan(time.monotonic_ns()).count == {}
    finally:
        probe.close()
