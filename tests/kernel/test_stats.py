import random

import pytest

from tcptrace.kernel.events import HIST_SLOTS, NCOUNTERS
from tcptrace.kernel.stats import StateStats, Summary, hist_slot, slot_lower
from tcptrace.states import NSTATES, TcpState


def test_slots_are_monotonic_and_bounded():
    values = [0, 1, 7, 8, 9, 15, 16, 17, 1000, 10**6, 10**9, 2**63, 2**64 - 1]
    slots = [hist_slot(v) for v in values]
    assert slots == sorted(slots)
    assert max(slots) < HIST_SLOTS


@pytest.mark.parametrize("value", [0, 5, 8, 100, 12345, 999_999_937, 2**40 + 3])
def test_slot_bounds_contain_value(value):
    slot = hist_slot(value)
    assert slot_lower(slot) <= value < slot_lower(slot + 1)
    # a bucket is at most 1/8 of its lower bound wide
    assert slot_lower(slot + 1) - slot_lower(slot) <= max(1, slot_lower(slot) // 8)


def test_percentiles_within_bucket_precision():
    rng = random.Random(7)
    values = [int(rng.lognormvariate(13, 2)) for _ in range(20000)]
    stats = StateStats()
    for v in values:
        stats.add(v)
    values.sort()
    for pct in (50, 90, 99):
        exact = values[int(len(values) * pct / 100) - 1]
        assert stats.percentile(pct) == pytest.approx(exact, rel=0.13)
    assert stats.max_ns == values[-1]
    assert stats.mean_ns == pytest.approx(sum(values) / len(values))


def test_empty_stats():
    assert StateStats().percentile(50) == 0.0
    assert StateStats().mean_ns == 0.0


def test_summary_from_maps_matches_python_path():
    py = Summary()
    py.record(TcpState.CLOSE, TcpState.SYN_SENT, 0, known=False)
    py.record(TcpState.SYN_SENT, TcpState.ESTABLISHED, 300_000, known=True)
    py.record(TcpState.ESTABLISHED, TcpState.FIN_WAIT1, 5_000_000, known=True)
    py.record(TcpState.ESTABLISHED, TcpState.CLOSE, 0, known=False)  # seen mid-life

    hist = [0] * (NSTATES * HIST_SLOTS)
    dsum = [0] * NSTATES
    dmax = [0] * NSTATES
    trans = [0] * (NSTATES * NSTATES)
    for (old, new), n in py.transitions.items():
        trans[old * NSTATES + new] = n
    for state, st in py.states.items():
        for i, n in enumerate(st.hist):
            hist[state * HIST_SLOTS + i] = n
        dsum[state] = st.total_ns
        dmax[state] = st.max_ns
    kernel = Summary.from_maps(hist, dsum, dmax, trans, [0] * NCOUNTERS)
    assert kernel.transitions == py.transitions
    for state in (TcpState.SYN_SENT, TcpState.ESTABLISHED):
        assert kernel.states[state].count == py.states[state].count
        assert kernel.states[state].unknown == py.states[state].unknown
        assert kernel.states[state].total_ns == py.states[state].total_ns
    assert kernel.states[TcpState.ESTABLISHED].unknown == 1
    # leaving CLOSE is a birth: never an "untimed" departure
    assert TcpState.CLOSE not in kernel.states
    assert kernel.total_transitions == 4


def test_merge():
    a, b = StateStats(), StateStats()
    a.add(10)
    b.add(1000)
    b.unknown = 2
    a.merge(b)
    assert (a.count, a.total_ns, a.max_ns, a.unknown) == (2, 1010, 1000, 2)
