"""Agent part: signals, the graceful drain, the forced stop, and allowlist reloads.

For: the signal loop (signals that arrived before it listened first, see __main__);
SIGHUP swaps in a freshly loaded allowlist (the old one stays on error); the first
SIGTERM/SIGINT drains (stop pulling, heartbeat ``draining``, let jobs finish up
to ``shutdown.grace_s``, bound recovery), a second one or the grace's end cancels
running jobs, whose final reports get ``kill_grace_s`` + REPORT_BOUND_S before the
jobs nursery is cancelled (what is unreported stays in state.json for next start).
I/O: signals, systemd notifications, allowlist files (read, in a thread).
Must not: stop the heartbeat loop (deregistration ends it), or touch running jobs
on an allowlist reload (they were checked against the list they were accepted by).
"""

from __future__ import annotations

import signal

import structlog
import trio

from .. import systemd
from ..allowlist import AllowlistError, load_allowlist
from .base import AgentParts

log = structlog.get_logger(__name__)

REPORT_BOUND_S = 30.0  # after the drain deadline, how long final reports may still take


class Draining(AgentParts):
    """Turn signals into a drain, a forced stop or a reload (a part of Agent)."""

    def begin_drain(self, reason: str) -> None:
        """First stop request: stop pulling, let jobs finish within the grace period."""
        if self.draining:
            return self.force_stop(reason)
        self.draining = True
        log.info(
            "drain_started",
            reason=reason,
            running=len(self.jobs),
            grace_s=self.cfg.shutdown.grace_s,
        )
        systemd.notify("STOPPING=1")
        self._startup_scope.cancel()
        self._pull_scope.cancel()
        self._heartbeat_now.set()
        self._changed_now()
        if self._root is not None:
            self._root.start_soon(self._drain_deadline)
            self._root.start_soon(self._bound_recovery)

    def force_stop(self, reason: str) -> None:
        """Second stop request: cancel running jobs now."""
        if self._forced:
            return
        self._forced = True
        log.warning("drain_forced", reason=reason, running=len(self.jobs))
        self._cancel_all_jobs()

    def _cancel_all_jobs(self) -> None:
        for handle in list(self.jobs.values()):
            handle.cancel("shutdown")
        if self._root is not None:
            self._root.start_soon(self._report_deadline)

    async def _drain_deadline(self) -> None:
        await trio.sleep(self.cfg.shutdown.grace_s)
        if self.jobs and not self._forced:
            log.warning("drain_grace_expired", cancelling=sorted(self.jobs))
            self._forced = True
            self._cancel_all_jobs()

    async def _report_deadline(self) -> None:
        # Cancelled jobs get kill_grace_s to die and a bounded time to report;
        # whatever is still unreported stays in state.json for the next start.
        await trio.sleep(self.cfg.shutdown.kill_grace_s + REPORT_BOUND_S)
        if self._jobs_scope is not None and self.jobs:
            log.error("final_reports_abandoned", jobs=sorted(self.jobs))
            self._jobs_scope.cancel()

    async def _signal_loop(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            while self._early_signals:  # arrived before we listened (see __main__)
                await self._on_signal(self._early_signals.pop(0))
            async for signum in signals:
                await self._on_signal(signum)

    async def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGHUP:
            await self.reload_allowlist()
        else:
            self.begin_drain(signal.Signals(signum).name)

    async def reload_allowlist(self) -> None:
        """SIGHUP: swap in freshly loaded allowlist files; keep the old ones on error.

        Running jobs are not touched: they were checked against the list in
        force when they were accepted.
        """
        files = self.cfg.runners.cli.allowlist_files if self.cfg.runners.cli.enable else []
        try:
            fresh = await trio.to_thread.run_sync(load_allowlist, files)
        except AllowlistError as exc:
            log.error(
                "allowlist_reload_failed",
                problems=exc.problems,
                kept=sorted(self._allowlist.entries),
            )
            return
        self._allowlist = fresh
        for warning in fresh.warnings:
            log.warning("allowlist_warning", detail=warning)
        log.info("allowlist_reloaded", entries=sorted(fresh.entries), running=len(self.jobs))
