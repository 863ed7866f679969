"""Wait on a condition with a deadline instead of sleeping a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold before the deadline."""


def wait_for(
    predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll `predicate` until it returns a truthy value; return that value.

    Exceptions from the predicate count as "not yet" until the deadline, then
    the last one is chained to the WaitTimeout for context.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_exc = None
        except Exception as exc:  # the predicate may race the thing it watches
            last_exc = exc
        if time.monotonic() >= deadline:
            raise WaitTimeout(
                f"timed out after {timeout}s waiting for {what or predicate}"
            ) from last_exc
        time.sleep(interval)


async def await_for(
    predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.01, what: str = ""
) -> T:
    """`wait_for` inside a trio test: sleeps with trio, so the loop under test keeps running."""
    import trio

    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(interval)
    raise WaitTimeout(f"timed out after {timeout}s waiting for {what or predicate}")
