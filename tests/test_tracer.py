"""The poll loop with a fake source: stages in order, stop conditions, the summary at the end."""

import time

from tcptrace.kernel.events import EVENT_STRUCT, decode
from tcptrace.kernel.stats import Summary
from tcptrace.stages import Stage
from tcptrace.tracer import StopConditions, Tracer


def raw(pid: int) -> bytes:
    return EVENT_STRUCT.pack(1, 2, 3, 0, pid, 0, 0, 0, b"", b"", 1, 2, 2, 7, 2, b"x")


class FakeSource:
    def __init__(self, batches):
        self.batches = list(batches)
        self.polls = 0

    def poll(self, timeout_ms):
        self.polls += 1
        if self.batches:
            return self.batches.pop(0)
        time.sleep(timeout_ms / 1000)
        return []

    def summary(self):
        s = Summary()
        s.counters[0] = 99
        return s


class Recorder(Stage):
    def __init__(self, log, name, replace=None):
        self.log, self.name, self.replace = log, name, replace

    def on_start(self):
        self.log.append((self.name, "start"))

    def on_events(self, events):
        self.log.append((self.name, [e.pid for e in events]))
        return self.replace(events) if self.replace else None

    def on_finish(self, summary):
        self.log.append((self.name, "finish", summary.counters[0]))


def test_count_truncates_and_stops():
    log = []
    src = FakeSource([[raw(1), raw(2)], [raw(3), raw(4), raw(5)], [raw(6)]])
    tracer = Tracer(src, [Recorder(log, "a")], StopConditions(count=4))
    tracer.run()
    assert log == [("a", "start"), ("a", [1, 2]), ("a", [3, 4]), ("a", "finish", 99)]
    assert tracer.handled == 4


def test_count_counts_transitions_not_accept_records():
    """--count 3: an accept record (F_ACCEPTED, not a transition) is not one of them."""
    from tcptrace.kernel.events import F_ACCEPTED

    accept = EVENT_STRUCT.pack(1, 2, 3, 0, 9, F_ACCEPTED, 0, 0, b"", b"", 1, 2, 2, 0, 0, b"x")
    log = []
    src = FakeSource([[raw(1), accept, raw(2)], [raw(3), raw(4)]])
    tracer = Tracer(src, [Recorder(log, "a")], StopConditions(count=3))
    tracer.run()
    assert log[1:3] == [("a", [1, 9, 2]), ("a", [3])]
    assert tracer.handled == 3


def test_stages_can_replace_a_batch():
    log = []
    stages = [
        Recorder(log, "enrich", replace=lambda evs: [e._replace(pid=e.pid * 10) for e in evs]),
        Recorder(log, "print"),
    ]
    Tracer(FakeSource([[raw(1)]]), stages, StopConditions(count=1)).run()
    assert ("print", [10]) in log


def test_duration_stops_without_events():
    start = time.monotonic()
    Tracer(FakeSource([]), [], StopConditions(duration=0.2)).run()
    assert 0.2 <= time.monotonic() - start < 2


def test_request_stop():
    tracer = Tracer(FakeSource([]), [], StopConditions())
    tracer.request_stop()
    summary = tracer.run()
    assert summary.counters[0] == 99


def test_tick_events_go_to_later_stages_only():
    log = []

    class Poller(Recorder):
        fired = False

        def on_tick(self, now_ns):
            if not self.fired:
                self.fired = True
                return [decode(raw(7))]
            return None

    stages = [Poller(log, "poll"), Recorder(log, "print")]
    Tracer(FakeSource([]), stages, StopConditions(duration=0.15)).run()
    assert ("print", [7]) in log
    assert ("poll", [7]) not in log


class Busy(Stage):
    """Burns CPU on every batch, as formatting does."""

    def __init__(self, cpu_s: float) -> None:
        self.cpu_s = cpu_s

    def on_events(self, events):
        end = time.process_time() + self.cpu_s
        while time.process_time() < end:
            pass


def test_cpu_budget_makes_the_loop_rest():
    batches = [[raw(i)] for i in range(10)]
    start = time.monotonic()
    Tracer(FakeSource(batches), [Busy(0.01)], StopConditions(count=10), cpu_budget=0.25).run()
    elapsed = time.monotonic() - start
    # 10 batches of >= 10 ms CPU at 25% of a CPU: >= 30 ms of rest after each
    assert elapsed >= 10 * 0.01 / 0.25 * 0.9


def test_the_loop_waits_its_poll_ms_and_a_quiet_session_waits_longer():
    from tcptrace.session import Options, poll_ms
    from tcptrace.tracer import POLL_MS, QUIET_POLL_MS

    waits = []

    class Timed(FakeSource):
        def poll(self, timeout_ms):
            waits.append(timeout_ms)
            return super().poll(0)

    tracer = Tracer(Timed([]), [], StopConditions(duration=0.5), poll_ms=QUIET_POLL_MS)
    tracer.run()
    assert waits and max(waits) == QUIET_POLL_MS and QUIET_POLL_MS > POLL_MS
    assert poll_ms(Options()) == POLL_MS  # a line per transition
    assert poll_ms(Options(interval=1.0)) == POLL_MS  # live frames
    assert poll_ms(Options(quiet=True)) == QUIET_POLL_MS
    assert poll_ms(Options(stuck={8: 10**9}, transitions=False)) == QUIET_POLL_MS
