"""--hist: each state's durations as a log2 histogram, in the manner of bcc's print_log2_hist.

Works from a Summary alone, whatever filled it: the kernel's per-CPU histograms
(live), StateStats.add (events replayed in Python), and the stages' corrections at
exit (TIME_WAIT followed in user space adds its durations through StateStats.add).
"""

from __future__ import annotations

from tcptrace.kernel.stats import HIST_SLOTS, StateStats, Summary, slot_lower
from tcptrace.outputs.output import format_duration
from tcptrace.states import LIFECYCLE_ORDER

# The widest bar, as bcc's stars_max.
BAR_WIDTH = 40
# What the histograms say when no socket left any state: --hist was heard.
NO_HISTOGRAM = "no histogram: no socket left a state"

# The power of two of every kernel slot. The kernel's slots split each power of two
# in sub-buckets and never straddle one, so collapsing them is exact.
_POWER = tuple(max(slot_lower(slot).bit_length() - 1, 0) for slot in range(HIST_SLOTS))


def bucket_bounds(power: int) -> tuple[int, int]:
    """The durations of one row, in ns: [low, high). Row 0 also holds 0 ns, as bcc's
    first row does."""
    return (0 if power == 0 else 1 << power), 1 << (power + 1)


def hist_rows(stats: StateStats) -> list[tuple[int, int, int]]:
    """(low ns, high ns, count) per power of two, from the first non-empty row to the
    last; the empty rows between them are kept, with 0."""
    counts: dict[int, int] = {}
    for slot, n in enumerate(stats.hist):
        if n:
            power = _POWER[slot]
            counts[power] = counts.get(power, 0) + n
    if not counts:
        return []
    return [
        (*bucket_bounds(power), counts.get(power, 0))
        for power in range(min(counts), max(counts) + 1)
    ]


def bar(count: int, largest: int, width: int = BAR_WIDTH) -> str:
    """Stars in proportion to the largest row, rounded up as bcc does: a row with any
    count shows at least one."""
    if count <= 0 or largest <= 0:
        return ""
    return "*" * min(width, -(-width * count // largest))


def format_state_hist(name: str, stats: StateStats) -> list[str]:
    """One state's block: its header, its rows, and the sockets no row can hold."""
    lines = [f"{name}: {stats.count + stats.unknown} left"]
    rows = hist_rows(stats)
    if rows:
        largest = max(n for _, _, n in rows)
        count_width = max(8, len(str(largest)))
        # bcc's columns: ten characters each side of the arrow
        lines.append(f"{'':5}{'time in ' + name:<19} : {'count':<{count_width}}  distribution")
        for low, high, n in rows:
            label = f"{format_duration(low):>10} -> {format_duration(high):<10}"
            lines.append(f"{label} : {n:<{count_width}} |{bar(n, largest):<{BAR_WIDTH}}|")
    if stats.unknown:
        # they existed before tracing (or a map forgot them): no duration to put in a row
        lines.append(f"{stats.unknown} left after an unknown time (UNTIMED): not in the histogram")
    return lines


def format_hist(summary: Summary) -> str:
    """Every state's histogram, in the exit summary's order, as text ending with a
    newline; states no socket left are not shown, and when none was left, one line."""
    blocks = []
    for state in LIFECYCLE_ORDER:
        stats = summary.states.get(int(state))
        if stats is None or (stats.count == 0 and stats.unknown == 0):
            continue
        blocks.append("\n".join(format_state_hist(state.name, stats)))
    if not blocks:
        return NO_HISTOGRAM + "\n"
    return "\n\n".join(blocks) + "\n"


def hist_record(stats: StateStats) -> list[dict[str, int]]:
    """The rows of one state for --json: the same numbers as the text, high exclusive."""
    return [{"low_ns": low, "high_ns": high, "count": n} for low, high, n in hist_rows(stats)]
