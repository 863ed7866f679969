"""systemd watchdog: WATCHDOG=1 from the event loop, and only while the daemon makes progress.

Pure rule (`verdict`, `watchdog_interval`) plus one thin trio loop
(`watchdog_loop`). It must not decide anything about jobs or talk to the
coordinator; it only reads the progress marks the agent exposes.

The rule (README "Watchdog rule"):

- starting (before READY=1): the daemon is registering, possibly retrying with
  backoff while the coordinator is unreachable. While the event loop runs and
  the node has not been rejected, every tick sends EXTEND_TIMEOUT_USEC so that
  a slow network at boot does not fail the start; a rejected node (bad token)
  or a blocked loop stops the extensions and TimeoutStartSec ends the start.
- serving (after READY=1): WATCHDOG=1 is sent only while the heartbeat loop is
  on schedule. Each heartbeat attempt (a success, or a failure after which the
  loop sleeps its backoff) leaves a mark: "I will try again in `next_in_s`".
  The loop is healthy while now <= mark + next_in_s + attempt budget, where the
  budget bounds one attempt (token renewal + heartbeat + a re-register on 401,
  each capped by coordinator.timeout_s). So a coordinator that is down keeps
  the pings going (backoff is running and on time); a heartbeat loop stuck in
  an await, or an event loop blocked by a synchronous call, stops them, and
  systemd kills and restarts the daemon WatchdogSec later.

The ping interval is half of $WATCHDOG_USEC (sd_watchdog_enabled semantics,
honouring $WATCHDOG_PID).

Test hook (test-only, inert unless set): when $AITBC_TEST_BLOCK_LOOP_FILE names
a file and that file exists, the watchdog task blocks the whole event loop with
`time.sleep()` forever, to let the system test prove that a hung loop is
restarted by systemd. Never set it in production.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import structlog
import trio

from . import systemd

log = structlog.get_logger(__name__)

TEST_BLOCK_ENV = "AITBC_TEST_BLOCK_LOOP_FILE"
STARTUP_TICK_S = 10.0  # EXTEND_TIMEOUT_USEC cadence when no watchdog is configured
ATTEMPT_SLACK_S = 10.0  # GPU snapshot, scheduling, jitter on top of the network timeouts


@dataclass(frozen=True)
class Progress:
    """What the agent exposes to the rule; all times are time.monotonic() seconds."""

    ready: bool  # READY=1 was sent (registered and serving)
    rejected: bool  # the coordinator refuses this node (bad/revoked token, banned)
    last_progress: float | None  # when the heartbeat loop last finished an attempt
    next_in_s: float  # how long it said it would wait before the next attempt
    attempt_budget_s: float  # upper bound of one heartbeat attempt


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    reason: str


def attempt_budget(coordinator_timeout_s: float) -> float:
    """Upper bound of one heartbeat attempt: renew + heartbeat + re-register, plus slack."""
    return 3 * coordinator_timeout_s + ATTEMPT_SLACK_S


def verdict(p: Progress, now: float) -> Verdict:
    """Is the daemon making progress? (the watchdog rule, see the module docstring)"""
    if not p.ready:
        if p.rejected:
            return Verdict(False, "starting: node rejected by the coordinator")
        return Verdict(True, "starting: registering")
    if p.last_progress is None:
        return Verdict(False, "no heartbeat loop progress mark")
    due = p.last_progress + p.next_in_s + p.attempt_budget_s
    if now <= due:
        return Verdict(True, "heartbeat loop on schedule")
    return Verdict(False, f"heartbeat loop overdue by {now - due:.1f}s")


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None when disabled."""
    raw = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


def _block_if_asked(environ: Mapping[str, str]) -> None:
    path = environ.get(TEST_BLOCK_ENV)
    if path and os.path.exists(path):
        log.warning("test_hook_blocking_event_loop", file=path)
        while True:  # deliberately synchronous: the whole event loop stops here
            time.sleep(3600)


async def watchdog_loop(
    progress: Callable[[], Progress],
    *,
    environ: Mapping[str, str] | None = None,
    notify: Callable[..., bool] = systemd.notify,
    now: Callable[[], float] = time.monotonic,
) -> None:
    """Run for the daemon's lifetime: ping or extend while `verdict` says healthy."""
    env = os.environ if environ is None else environ
    interval = watchdog_interval(env, os.getpid())
    tick = interval if interval is not None else STARTUP_TICK_S
    # The test hook only needs a short tick to react quickly; it is never set in production.
    if env.get(TEST_BLOCK_ENV):
        tick = min(tick, 0.5)
    withheld = False
    while True:
        _block_if_asked(env)
        p = progress()
        v = verdict(p, now())
        if not p.ready:
            if v.healthy:
                notify(f"EXTEND_TIMEOUT_USEC={int(tick * 3 * 1_000_000)}")
        elif interval is not None:
            if v.healthy:
                notify("WATCHDOG=1")
                if withheld:
                    log.info("watchdog_resumed", reason=v.reason)
                withheld = False
            elif not withheld:
                log.error("watchdog_withheld", reason=v.reason)
                withheld = True
        await trio.sleep(tick)
