"""The watchdog rule (pure) and the ping loop driven by trio's MockClock."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from aitbc_miner import watchdog
from aitbc_miner.watchdog import Progress, verdict

BUDGET = watchdog.attempt_budget(20)


def serving(last: float | None, next_in: float) -> Progress:
    return Progress(
        ready=True, rejected=False, last_progress=last, next_in_s=next_in, attempt_budget_s=BUDGET
    )


def test_attempt_budget_bounds_three_requests() -> None:
    assert BUDGET == 3 * 20 + watchdog.ATTEMPT_SLACK_S


def test_starting_is_healthy_until_rejected() -> None:
    p = Progress(ready=False, rejected=False, last_progress=None, next_in_s=0, attempt_budget_s=1)
    assert verdict(p, 1e6).healthy
    rejected = Progress(
        ready=False, rejected=True, last_progress=None, next_in_s=0, attempt_budget_s=1
    )
    assert not verdict(rejected, 0).healthy


def test_on_schedule_including_a_long_backoff() -> None:
    # a coordinator that is down: the loop sleeps a 120 s backoff, and that is fine
    assert verdict(serving(100.0, 120.0), 100.0 + 120.0 + BUDGET).healthy


def test_overdue_loop_is_unhealthy() -> None:
    v = verdict(serving(100.0, 15.0), 100.0 + 15.0 + BUDGET + 0.1)
    assert not v.healthy
    assert "overdue" in v.reason


def test_serving_without_a_mark_is_unhealthy() -> None:
    assert not verdict(serving(None, 0), 0).healthy


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "6000000"}, 3.0),
        ({"WATCHDOG_USEC": "6000000", "WATCHDOG_PID": str(os.getpid())}, 3.0),
        ({"WATCHDOG_USEC": "6000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
    ],
)
def test_interval_is_half_of_watchdog_usec(env: dict[str, str], expected: float | None) -> None:
    assert watchdog.watchdog_interval(env, os.getpid()) == expected


class Agentish:
    """A stand-in for the agent's progress marks, advanced by the test."""

    def __init__(self) -> None:
        self.ready = False
        self.last: float | None = None
        self.next_in = 0.0

    def progress(self) -> Progress:
        return Progress(
            ready=self.ready,
            rejected=False,
            last_progress=self.last,
            next_in_s=self.next_in,
            attempt_budget_s=5.0,
        )


async def test_loop_extends_then_pings_then_withholds_when_overdue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sent: list[tuple[float, str]] = []
    agent = Agentish()

    def notify(*fields: str) -> bool:
        sent.extend((trio.current_time(), f) for f in fields)
        return True

    env = {"WATCHDOG_USEC": "2000000"}  # ping every 1 s
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: watchdog.watchdog_loop(
                agent.progress, environ=env, notify=notify, now=trio.current_time
            )
        )
        await trio.sleep(2.5)
        assert sent and all(f.startswith("EXTEND_TIMEOUT_USEC=") for _, f in sent)
        sent.clear()
        agent.ready, agent.last, agent.next_in = True, trio.current_time(), 2.0
        await trio.sleep(3.0)  # within last + next_in + budget (7 s)
        assert [f for _, f in sent] and all(f == "WATCHDOG=1" for _, f in sent)
        sent.clear()
        await trio.sleep(10.0)  # now overdue: no more pings
        assert all(t <= agent.last + 7.0 + 1e-6 for t, _ in sent)
        agent.last = trio.current_time()  # the loop recovered
        sent.clear()
        await trio.sleep(1.5)
        assert [f for _, f in sent] == ["WATCHDOG=1"] * len(sent) and sent
        nursery.cancel_scope.cancel()


def test_block_hook_is_inert_without_the_file(tmp_path: os.PathLike[str]) -> None:
    marker = os.path.join(tmp_path, "block")
    watchdog._block_if_asked({})  # returns at once
    watchdog._block_if_asked({watchdog.TEST_BLOCK_ENV: marker})  # file absent: returns
