"""The loader's compile knobs and map contents, without loading anything."""

from __future__ import annotations

import ctypes

from tcptrace.filters import ALL_STATES, JUDGED_STATES, CgroupFilter, Filters
from tcptrace.kernel.btf import SockOffsets
from tcptrace.kernel.loader import LEVELS, Probe, ProbeConfig, fold_levels
from tcptrace.states import NSTATES, TcpState


class FakeMap:
    """What Probe writes into a map, by integer key."""

    def __init__(self) -> None:
        self.values: dict[int, int] = {}

    def __setitem__(self, key: ctypes.c_int, value: ctypes.c_uint64) -> None:
        self.values[key.value] = value.value


def knob(config: ProbeConfig, name: str) -> str:
    (flag,) = [f for f in config.cflags() if f.startswith(f"-D{name}=")]
    return flag.split("=", 1)[1]


def test_slower_than_is_a_compile_knob_off_by_default():
    # the default program is compiled without the check: it pays nothing for it
    assert knob(ProbeConfig(), "SLOWER_THAN") == "0"
    filters = Filters(slower_than=((int(TcpState.SYN_SENT), 100_000_000),))
    assert knob(ProbeConfig(filters=filters), "SLOWER_THAN") == "1"


def test_slow_ns_map_holds_each_judged_states_threshold():
    est = int(TcpState.ESTABLISHED)
    filters = Filters(slower_than=((ALL_STATES, 10**9), (est, 5 * 10**9)))
    probe = Probe.__new__(Probe)  # no bcc: only the filling
    probe.config = ProbeConfig(filters=filters)
    slow_ns = FakeMap()
    probe.bpf = {b"slow_ns": slow_ns}
    probe._fill_slow_ns()
    assert slow_ns.values == {int(s): 5 * 10**9 if s == est else 10**9 for s in JUDGED_STATES}
    # without --slower-than nothing is written (the map stays zero: never slow)
    probe.config = ProbeConfig()
    slow_ns.values.clear()
    probe._fill_slow_ns()
    assert slow_ns.values == {}


def test_the_nested_program_is_compiled_in_with_the_offsets_it_reads():
    assert knob(ProbeConfig(), "NESTED") == "0"
    offsets = SockOffsets({"SK_FAMILY_OFFSET": 16, "INET_SPORT_OFFSET": 814})
    config = ProbeConfig(sock_offsets=offsets)
    assert knob(config, "NESTED") == "1"
    assert (knob(config, "SK_FAMILY_OFFSET"), knob(config, "INET_SPORT_OFFSET")) == ("16", "814")


def test_the_longest_time_in_a_state_is_the_largest_of_either_programs():
    # dmax is kept per program: the nested one may run between the other's read and write
    dmax = [0] * (NSTATES * LEVELS)
    dmax[int(TcpState.ESTABLISHED)] = 5
    dmax[NSTATES + int(TcpState.ESTABLISHED)] = 7
    dmax[NSTATES + int(TcpState.LISTEN)] = 3
    dmax[int(TcpState.SYN_SENT)] = 2
    folded = fold_levels(dmax)
    assert len(folded) == NSTATES
    assert folded[int(TcpState.ESTABLISHED)] == 7
    assert (folded[int(TcpState.LISTEN)], folded[int(TcpState.SYN_SENT)]) == (3, 2)


class FakeMembers(dict):
    """bcc's hash table as _walk_cgroups uses it: u64 keys, u8 leaves."""

    Key = ctypes.c_uint64
    Leaf = ctypes.c_uint8

    def __setitem__(self, key, leaf) -> None:
        super().__setitem__(key.value, leaf.value)

    def __delitem__(self, key) -> None:
        super().__delitem__(key.value)


def test_walked_cgroups_follow_the_tree_made_and_removed(tmp_path):
    # --cgroup where the kernel has no ancestor helper: the map holds the filtered
    # cgroup and those below it as they are now, never cgroups long gone
    top = tmp_path / "pod"
    (top / "a").mkdir(parents=True)
    probe = Probe.__new__(Probe)
    probe.bpf = {b"cgroup_members": FakeMembers()}
    probe.config = ProbeConfig(
        filters=Filters(cgroups=(CgroupFilter("/pod", 1, 1, str(top)),)), cgroup_ancestor=False
    )
    probe._cgroup_members = set()
    probe._walk_cgroups()
    ino = {p.name: p.stat().st_ino for p in (top, top / "a")}
    assert set(probe.bpf[b"cgroup_members"]) == {ino["pod"], ino["a"]}
    (top / "a").rmdir()
    (top / "b").mkdir()
    probe._walk_cgroups()
    assert set(probe.bpf[b"cgroup_members"]) == {ino["pod"], (top / "b").stat().st_ino}
