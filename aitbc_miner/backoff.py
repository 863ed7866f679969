"""Jittered intervals and exponential backoff with full jitter.

Pure: randomness is injected as a `random.Random`, so tests seed it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def jittered(interval_s: float, jitter_pct: float, rng: random.Random) -> float:
    """`interval_s` ± `jitter_pct` percent, uniformly."""
    spread = interval_s * jitter_pct / 100.0
    return rng.uniform(interval_s - spread, interval_s + spread)


def full_jitter(attempt: int, min_s: float, max_s: float, rng: random.Random) -> float:
    """Delay before retry number `attempt` (0-based).

    "Full jitter" (AWS architecture blog): uniform over [min_s, cap] where the
    cap doubles per attempt from `min_s` up to `max_s`. The floor keeps a
    flapping coordinator from being hammered by near-zero delays.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    cap = min(max_s, min_s * (2 ** min(attempt, 62)))
    return rng.uniform(min_s, max(min_s, cap))


@dataclass
class Backoff:
    """Stateful wrapper: successive `next()` delays grow until `reset()`."""

    min_s: float
    max_s: float
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next(self, retry_after_s: float | None = None) -> float:
        """The next delay; a server's Retry-After wins, capped at `max_s`."""
        delay = full_jitter(self.attempt, self.min_s, self.max_s, self.rng)
        self.attempt += 1
        if retry_after_s is not None:
            return min(max(retry_after_s, 0.0), self.max_s)
        return delay

    def reset(self) -> None:
        self.attempt = 0
