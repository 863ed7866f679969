"""Hypothesis profiles for the fuzz properties, and a count of generated inputs.

`make test` runs every property with a small, fast example budget; `make fuzz`
(HYPOTHESIS_PROFILE=fuzz) runs the same properties with a large one. Each property
scales the budget by a weight, so slow ones (a whole daemon) get fewer examples.
"""

from __future__ import annotations

import os
from collections import Counter

from hypothesis import HealthCheck, settings

QUICK = "fuzz-quick"
FUZZ = "fuzz"
_COMMON = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
    "print_blob": True,
}
settings.register_profile(QUICK, max_examples=60, **_COMMON)
settings.register_profile(FUZZ, max_examples=2000, **_COMMON)

ACTIVE = FUZZ if os.environ.get("HYPOTHESIS_PROFILE") == FUZZ else QUICK
GENERATED: Counter[str] = Counter()


def budget(weight: float = 1.0) -> settings:
    """The active profile with max_examples scaled by `weight` (at least 2)."""
    base = settings.get_profile(ACTIVE)
    return settings(base, max_examples=max(2, int(base.max_examples * weight)))


def seen(kind: str, count: int = 1) -> None:
    """Count generated inputs of `kind` (reported at the end of the run)."""
    GENERATED[kind] += count
