"""Jitter and backoff: pure functions over a seeded random.Random."""

from __future__ import annotations

import random

import pytest

from aitbc_miner.backoff import Backoff, full_jitter, jittered

N = 5000


@pytest.mark.parametrize(("interval", "pct"), [(15.0, 10.0), (60.0, 25.0), (1.0, 50.0)])
def test_jittered_within_bounds_and_spread(interval: float, pct: float) -> None:
    rng = random.Random(42)
    lo, hi = interval * (1 - pct / 100), interval * (1 + pct / 100)
    samples = [jittered(interval, pct, rng) for _ in range(N)]
    assert all(lo <= s <= hi for s in samples)
    spread = hi - lo
    # Uniform over the whole band: extremes come close to both bounds.
    assert min(samples) < lo + 0.01 * spread
    assert max(samples) > hi - 0.01 * spread
    mean = sum(samples) / N
    assert abs(mean - interval) < 0.05 * spread


def test_jittered_zero_pct_is_exact() -> None:
    rng = random.Random(1)
    assert {jittered(15.0, 0.0, rng) for _ in range(10)} == {15.0}


def test_jittered_is_deterministic_for_a_seed() -> None:
    a = [jittered(10, 20, random.Random(7)) for _ in range(3)]
    b = [jittered(10, 20, random.Random(7)) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("attempt", range(8))
def test_full_jitter_within_doubling_cap(attempt: int) -> None:
    rng = random.Random(attempt)
    min_s, max_s = 1.0, 30.0
    cap = min(max_s, min_s * 2**attempt)
    samples = [full_jitter(attempt, min_s, max_s, rng) for _ in range(2000)]
    assert all(min_s <= s <= cap for s in samples)
    if cap > min_s:
        assert max(samples) > cap - 0.02 * (cap - min_s)
        assert min(samples) < min_s + 0.02 * (cap - min_s)


def test_full_jitter_first_attempt_is_the_floor() -> None:
    assert full_jitter(0, 2.0, 60.0, random.Random(0)) == 2.0


def test_full_jitter_reaches_and_never_exceeds_max() -> None:
    rng = random.Random(3)
    samples = [full_jitter(10, 1.0, 8.0, rng) for _ in range(2000)]
    assert max(samples) <= 8.0
    assert max(samples) > 7.9


@pytest.mark.parametrize("attempt", [63, 64, 1000, 10**6, 10**18])
def test_full_jitter_huge_attempt_numbers(attempt: int) -> None:
    rng = random.Random(5)
    samples = [full_jitter(attempt, 1.0, 120.0, rng) for _ in range(200)]
    assert all(1.0 <= s <= 120.0 for s in samples)
    assert max(samples) > 100.0


def test_full_jitter_min_above_max_stays_at_min() -> None:
    # A misconfiguration must not produce a delay below the floor or an error.
    assert full_jitter(3, 10.0, 5.0, random.Random(0)) == 10.0


@pytest.mark.parametrize("attempt", [-1, -100])
def test_full_jitter_negative_attempt_raises(attempt: int) -> None:
    with pytest.raises(ValueError):
        full_jitter(attempt, 1.0, 10.0, random.Random(0))


def test_backoff_grows_then_resets() -> None:
    b = Backoff(1.0, 64.0, random.Random(9))
    caps = []
    for _ in range(8):
        caps.append(min(64.0, 2.0**b.attempt))
        d = b.next()
        assert 1.0 <= d <= caps[-1]
    assert b.attempt == 8
    b.reset()
    assert b.attempt == 0
    assert b.next() == 1.0  # attempt 0: the cap equals the floor


def test_backoff_delays_grow_on_average() -> None:
    rng = random.Random(11)
    firsts, laters = [], []
    for _ in range(300):
        b = Backoff(1.0, 100.0, rng)
        firsts.append(b.next())
        for _ in range(5):
            b.next()
        laters.append(b.next())  # attempt 6: uniform over [1, 64]
    assert sum(firsts) / len(firsts) == 1.0
    assert sum(laters) / len(laters) > 20.0


def test_backoff_retry_after_wins() -> None:
    b = Backoff(1.0, 60.0, random.Random(0))
    assert b.next(retry_after_s=17.0) == 17.0
    assert b.attempt == 1  # it still counts as an attempt


def test_backoff_retry_after_is_capped_at_max() -> None:
    b = Backoff(1.0, 30.0, random.Random(0))
    assert b.next(retry_after_s=3600.0) == 30.0


def test_backoff_retry_after_is_floored_at_zero() -> None:
    b = Backoff(1.0, 30.0, random.Random(0))
    assert b.next(retry_after_s=-5.0) == 0.0
    assert b.next(retry_after_s=0.0) == 0.0


def test_backoff_default_rng_works() -> None:
    b = Backoff(2.0, 4.0)
    assert b.next() == 2.0
    assert 2.0 <= b.next() <= 4.0
