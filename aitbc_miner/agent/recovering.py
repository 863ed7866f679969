"""Agent part: crash recovery at start-up, its bound while draining, and retention.

For: scanning the workspace once the jobs nursery is open, reconciling each
interrupted job in the background (one :meth:`JobRun.recover` per job; a new
attempt of the same job waits for it through ``Agent.recovering``), cutting
recovery short when a drain outlasts the report bound, and the loop that sweeps
expired workspaces. The decisions (what to do with each state.json, what is
expired) are aitbc_miner.recovery's; this part only schedules them.
I/O: filesystem scans and sweeps (in threads); coordinator calls through JobRun.
Must not: let one job's recovery error stop the others or the daemon.
"""

from __future__ import annotations

import functools
import time

import structlog
import trio

from ..jobs import JobContext, JobRun
from ..lifecycle import Recovery
from ..recovery import Found, scan, sweep
from .base import AgentParts
from .drain import REPORT_BOUND_S

log = structlog.get_logger(__name__)


class Recovering(AgentParts):
    """Reconcile what a crash left behind, and sweep old workspaces (a part of Agent)."""

    async def _start_recovery(self, ctx: JobContext, jobs: trio.Nursery) -> None:
        """Scan the workspace and reconcile interrupted jobs (in the background)."""
        started = time.monotonic()
        found = await trio.to_thread.run_sync(scan, ctx.root)
        todo = [f for f in found if f.action is not Recovery.LEAVE]
        counts: dict[str, int] = {}
        for f in found:
            counts[f.action.value] = counts.get(f.action.value, 0) + 1
            self.metrics.recovered.labels(action=f.action.value).inc()
        log.info("recovery_scan", workspaces=len(found), actions=counts)
        if not todo:
            return
        for f in todo:
            self.recovering[f.state.job_id] = trio.Event()
        jobs.start_soon(self._recover_all, ctx, todo, started)

    async def _recover_all(self, ctx: JobContext, todo: list[Found], started: float) -> None:
        with self._recovery_scope:
            async with trio.open_nursery() as nursery:
                for f in todo:
                    nursery.start_soon(self._recover_one, ctx, f)
        log.info(
            "recovery_finished",
            jobs=len(todo),
            elapsed_s=round(time.monotonic() - started, 3),
            cut_short=self._recovery_scope.cancelled_caught,
        )

    async def _recover_one(self, ctx: JobContext, found: Found) -> None:
        try:
            await JobRun.for_recovery(ctx, found.job_dir, found.state).recover(found.action)
        except Exception:
            log.exception("job_recovery_error", job_id=found.state.job_id)
        finally:
            self.recovering.pop(found.state.job_id).set()

    async def _sweep_loop(self) -> None:
        ws = self.cfg.workspace
        while True:
            try:
                removed = await trio.to_thread.run_sync(
                    functools.partial(
                        sweep, ws.root, keep_success_s=ws.keep_success, keep_failed_s=ws.keep_failed
                    )
                )
                if removed:
                    log.info("sweep_finished", removed=removed)
            except OSError as exc:
                log.error("sweep_failed", error=str(exc))
            await trio.sleep(ws.sweep_interval_s)

    async def _bound_recovery(self) -> None:
        await trio.sleep(REPORT_BOUND_S)
        if self.recovering:
            log.warning("recovery_cut_short", jobs=sorted(self.recovering))
            self._recovery_scope.cancel()
