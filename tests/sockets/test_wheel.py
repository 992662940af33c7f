"""When the timer wheel runs a TIME_WAIT's timer (no kernel needed)."""

from tcptrace.sockets.wheel import NS_PER_S, TimerWheel, level_grain

HZ = 250
TICK = NS_PER_S // HZ
# CLOCK_MONOTONIC when jiffy J0 began
START, J0 = 1_000_000_123, 4_294_000_000


def jiffies_at(t: int) -> int:
    return (J0 + (t - START) // TICK) % (1 << 32)


def test_levels_are_those_of_calc_wheel_index():
    assert [level_grain(d) for d in (0, 62, 63, 503, 504, 4031, 4032, 32255, 32256)] == [
        1, 1, 8, 8, 64, 64, 512, 512, 4096,
    ]  # fmt: skip
    assert level_grain(60 * HZ) == 512  # TIME_WAIT at HZ=250: 2.048 s buckets


def test_hz_and_phase_come_from_the_events_even_across_the_32_bit_wrap():
    wheel = TimerWheel()
    assert wheel.fires_ns(START, START + 60 * NS_PER_S) is None  # nothing learnt yet
    for i in range(40):
        t = START + i * 37_000_001  # events at odd times, the count wrapping meanwhile
        wheel.note(t, jiffies_at(t))
    assert wheel.hz == HZ
    armed = START + 1_500_000_000 + 1_000_000  # 1 ms into a jiffy
    expires = armed + 60 * NS_PER_S
    # the kernel: expiry jiffy E rounded up to the next multiple of 512, never early
    e = jiffies_at(expires)
    bucket = (e // 512 + 1) * 512
    kernel = START + (bucket - J0) * TICK
    assert abs(wheel.fires_ns(armed, expires) - kernel) <= TICK
    assert 0 < wheel.fires_ns(armed, expires) - expires <= 512 * TICK + TICK


def test_pairs_too_close_together_do_not_guess_hz():
    wheel = TimerWheel()
    for i in range(5):
        t = START + i * 10_000_000
        wheel.note(t, jiffies_at(t))
    assert wheel.hz is None
