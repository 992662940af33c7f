"""Where every event went: lost (never counted twice), evicted, missed; and the stderr report."""

import io

from tcptrace.kernel import events
from tcptrace.kernel.stats import Summary
from tcptrace.outputs.losses import LossReport
from tcptrace.outputs.output import format_accounting


class Source:
    """What LossReport reads from the probe: live losses, and the final accounting."""

    def __init__(self, lost_so_far):
        self.lost_so_far = lost_so_far
        self.finished = []

    def finish_accounting(self, summary):
        self.finished.append(summary)


def summary(**counters: int) -> Summary:
    s = Summary()
    for name, value in counters.items():
        s.counters[getattr(events, name)] = value
    return s


def test_a_dropped_event_is_lost_once_not_twice():
    # the kernel counts the failed submission, perf reports the same loss later
    s = summary(C_SEEN=100, C_DROPPED=30)
    s.lost = 30
    assert s.lost_total == 30
    s.lost = 12  # perf's lost records not all read yet
    assert s.lost_total == 30


def test_lost_adds_shed_and_unread():
    s = summary(C_SEEN=100, C_DROPPED=5, C_SHED=7)
    s.unread = 3
    assert s.lost_total == 15
    assert format_accounting(s, printed=85) == "100 transitions traced, 85 shown, 15 lost"


def test_evictions_are_inserts_minus_deletes_minus_entries_left():
    s = summary(C_SEEN=10, C_INSERTED=5000, C_DELETED=600)
    s.sockets_tracked = 256
    assert s.evicted == 4144
    assert format_accounting(s, printed=10).endswith(
        ", 4144 evicted from the full socket map (raise --max-sockets)"
    )


def test_no_evictions_no_noise_and_races_never_negative():
    s = summary(C_SEEN=12, C_INSERTED=6, C_DELETED=6)
    assert format_accounting(s, printed=12) == "12 transitions traced, 12 shown, 0 lost"
    s.sockets_tracked = 2  # a delete and an insert racing on two CPUs
    assert s.evicted == 0


def test_faster_than_slower_than_adds_up_and_is_not_lost():
    # the kernel counts what it did not submit for being fast: shown + faster + lost
    s = summary(C_SEEN=1200, C_FAST=1186)
    s.slower_than = "1s"
    assert s.faster == 1186 and s.lost_total == 0
    assert format_accounting(s, printed=14) == (
        "1200 transitions traced, 14 shown (slower than 1s), 1186 faster, 0 lost"
    )
    s = summary(C_SEEN=100, C_FAST=0, C_SHED=3)
    s.slower_than = "SYN_SENT=100ms,ESTABLISHED=5s"
    assert format_accounting(s, printed=97) == (
        "100 transitions traced, 97 shown (slower than SYN_SENT=100ms,ESTABLISHED=5s), "
        "0 faster, 3 lost"
    )


def test_kernel_misses_stay_off_the_accounting_line():
    # they count every TCP socket's hits, not only the traced ones: stderr says so
    s = summary(C_SEEN=59902)
    s.missed = 30
    assert format_accounting(s, printed=59902) == "59902 transitions traced, 59902 shown, 0 lost"


def test_loss_report_live_is_throttled_and_final_goes_to_stderr():
    lost = [0]
    err = io.StringIO()
    source = Source(lambda: lost[0])
    report = LossReport(source, err)
    report.on_tick(1)
    assert err.getvalue() == ""  # nothing lost, nothing said
    lost[0] = 40
    report.on_tick(2)  # within the second after the last check
    assert err.getvalue() == ""
    report.on_tick(1_000_000_002)
    assert err.getvalue().startswith("tcptrace: 40 events lost so far: the output did not keep up")
    lost[0] = 45
    report.on_tick(1_500_000_000)  # throttled
    assert err.getvalue().count("\n") == 1
    final = summary(C_SEEN=100, C_DROPPED=45)
    final.missed = 3
    report.on_finish(final)
    assert source.finished == [final]  # the final accounting is completed first
    lines = err.getvalue().splitlines()
    assert lines[1].startswith("tcptrace: 45 events lost in all")
    assert lines[2].startswith("tcptrace: up to 3 transitions were never seen")


def test_skipped_closes_found_by_the_kernel_are_told_among_the_misses():
    err = io.StringIO()
    final = summary(C_SEEN=100, C_STALE=2)
    final.missed = 5
    LossReport(Source(lambda: 0), err).on_finish(final)
    assert final.stale == 2
    assert err.getvalue().startswith(
        "tcptrace: up to 5 transitions were never seen (2 of them a traced socket's close,"
    )


def test_loss_report_silent_when_nothing_lost():
    err = io.StringIO()
    LossReport(Source(lambda: 0), err).on_finish(summary(C_SEEN=5))
    assert err.getvalue() == ""


def test_which_kernels_count_skipped_tracepoint_hits():
    from tests.integration.accounting import kernel_counts_misses

    assert kernel_counts_misses("6.18.44-fc-v669")
    assert kernel_counts_misses("6.7.0")
    assert not kernel_counts_misses("6.1.0-56-amd64")


def test_loss_advice_names_the_cause_the_options_make():
    from tcptrace.outputs.losses import ADVICE, advice

    assert advice() == ADVICE
    assert advice(max_cpu=0.05).startswith("--max-cpu 5 capped the reader")
    # --lifetime refuses --quiet: not offered
    assert "--quiet" not in advice(lifetime=True) and "--quiet" in ADVICE
