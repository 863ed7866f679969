"""JobRun part: prepare the inputs, then run the job's process in its sandbox.

For: fetching the inputs (inline, URLs, the model cache) while the job can still be
cancelled, the job's cgroup (a warm start taken from the pool, or one created on the
spot; recorded in state only, JobRun saves it before anything runs in it), the
limits and Landlock rules of the spawn, the process itself with its progress relay
and disk watch beside it, and the timings and usage it leaves in the state.
I/O: downloads, processes, cgroups; coordinator progress calls; state.json through
Reporting's ``_persist`` (the pgid when no cgroup finds the job's processes).
Must not: judge how the process ended (checks.check_exit does), remove the cgroup or
give back the warm start (JobRun's shielded ``finally`` does, whatever happens here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import structlog
import trio

from .._trio import unwrap_group
from ..cache import fetch_input
from ..errors import CoordinatorError, ErrorCode, JobFailure, JobGone
from ..lifecycle import Phase
from ..manifest import Manifest
from ..probe import disk_free_mb
from ..runners.base import ProcessResult, Spawn, run_process
from ..sandbox.cgroups import JobCgroup, limit_files
from ..sandbox.limits import landlock_rules, process_limits, tcp_fallback
from ..workspace import MIB
from .checks import cancel_failure
from .model import JobContext, JobHandle, JobParts, Plan, utcnow

log = structlog.get_logger(__name__)

DISK_CHECK_S = 0.5
INPUT_DEFAULT_MAX_MB = 1024


class Execution(JobParts):
    """Inputs, cgroup, process, progress (a part of JobRun)."""

    async def _prepare(self, m: Manifest) -> None:
        ws = self.ws
        assert ws is not None
        inputs = m.inputs
        for rel, text in inputs.inline.items():
            ws.write_inline(rel, text)
        for spec in inputs.urls:
            await fetch_input(
                self.ctx.cache,
                spec,
                ws.input / spec.path,
                functools.partial(ws.download, self.ctx.downloads, spec, INPUT_DEFAULT_MAX_MB),
                default_max_mb=INPUT_DEFAULT_MAX_MB,
            )
        ws.expose_inputs([*inputs.inline, *(u.path for u in inputs.urls)])

    async def _interruptible(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn`, abandoning it with E_CANCELLED if the job is cancelled meanwhile."""
        cancelled = False
        with unwrap_group():
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal cancelled
                    await self.handle.cancel_event.wait()
                    cancelled = True
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                await fn(*args)
                nursery.cancel_scope.cancel()
        if cancelled:
            raise self._cancel_failure()

    def _cancel_failure(self) -> JobFailure:
        return cancel_failure(self.handle.cancel_reason, self.ctx.cfg.workspace.min_free_mb)

    def _landlock(self, plan: Plan) -> dict[str, Any]:
        if not self.ctx.landlock or self.ws is None:
            return {}
        deny_tcp = tcp_fallback(
            network=plan.network, netns=self.ctx.netns, landlock_abi=self.ctx.landlock_abi
        )
        return {
            "landlock": landlock_rules(str(self.ws.path), list(plan.read_paths), deny_tcp=deny_tcp)
        }

    async def _make_cgroup(self, plan: Plan) -> None:
        support = self.ctx.sandbox
        if not support.active:
            return
        assert self.state is not None
        files = limit_files(plan.mem_mb, plan.cpu_threads, self.ctx.cfg.resources.max_pids)
        try:
            if self.ctx.warm is not None:
                netns = self.ctx.netns and not plan.network  # as process_limits decides
                self.warm = await self.ctx.warm.take(files, netns=netns)
            if self.warm is not None:
                self.cgroup = self.warm.cgroup
            else:
                self.cgroup = await trio.to_thread.run_sync(
                    JobCgroup.create, support, self.handle.job_id, self.handle.attempt, files
                )
        except OSError as exc:
            raise JobFailure(ErrorCode.CRASH, f"could not create the job's cgroup: {exc}") from None
        self.state = self.state.evolve(cgroup=self.cgroup.primary)

    async def _execute(self, plan: Plan) -> ProcessResult:
        ws = self.ws
        assert ws is not None
        cfg = self.ctx.cfg
        self.handle.phase = Phase.RUNNING
        self.ctx.metrics.running.inc()
        self.state = self.state.evolve(started_at=utcnow()) if self.state else None

        async def started(pgid: int) -> None:
            warm = self.warm is not None and self.warm.stem == pgid  # the stem became the job
            self.ctx.metrics.job_starts.labels(start="warm" if warm else "cold").inc()
            assert self.state is not None
            self.state = self.state.evolve(pgid=pgid)
            if self.cgroup is None:  # a recorded cgroup already finds every process
                await self._persist()

        try:
            with unwrap_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._progress_loop)
                    nursery.start_soon(watch_disk, self.ctx, self.handle)
                    try:
                        result = await run_process(
                            Spawn(
                                argv=plan.argv,
                                cwd=ws.work,
                                env=plan.env,
                                log_path=ws.exec_log,
                                timeout_s=plan.timeout_s,
                                kill_grace_s=cfg.shutdown.kill_grace_s,
                                log_cap_bytes=int(cfg.workspace.exec_log_max_mb * MIB),
                                limits=process_limits(
                                    self.ctx.limit_policy,
                                    mem_mb=plan.mem_mb,
                                    max_output_mb=plan.max_output_mb,
                                    memory_cgroup=self.cgroup is not None
                                    and self.cgroup.limits_memory,
                                    network=plan.network or not self.ctx.netns,
                                    cgroup_procs=self.cgroup.procs_files if self.cgroup else [],
                                )
                                | self._landlock(plan)
                                | ({"stem": self.warm.ref} if self.warm else {}),
                            ),
                            cancel=self.handle.cancel_event,
                            spawner=self.ctx.spawner,
                            cgroup=self.cgroup,
                            on_progress=self._on_progress,
                            on_started=started,
                        )
                    finally:
                        nursery.cancel_scope.cancel()
        except OSError as exc:
            raise JobFailure(ErrorCode.EXIT, f"could not start the job: {exc.strerror}") from None
        finally:
            self.ctx.metrics.running.dec()
        assert self.state is not None
        self.state = self.state.evolve(
            finished_at=utcnow(),
            exit_code=result.exit_code,
            duration_s=result.wall_s,
            usage={
                "cpu_s": result.cpu_s,
                "max_rss_mb": result.max_rss_mb,
                "gpu": list(self.handle.gpu_indices),
            },
        )
        return result

    def _on_progress(self, pct: int, note: str) -> None:
        self._progress = (pct, note)
        self._progress_wakeup.set()

    async def _progress_loop(self) -> None:
        interval = self.ctx.cfg.coordinator.progress_min_interval_s
        while True:
            await self._progress_wakeup.wait()
            self._progress_wakeup = trio.Event()
            if self._progress is None:
                continue
            pct, note = self._progress
            try:
                reply = await self.ctx.client.progress(
                    self.handle.job_id, self.handle.attempt, pct, note
                )
            except JobGone:
                self.handle.cancel("lease_lost")
                return
            except CoordinatorError as exc:
                log.debug("progress_not_sent", error=str(exc))
            else:
                if reply.cancel:
                    log.info("job_cancel_requested", source="progress")
                    self.handle.cancel("coordinator")
            await trio.sleep(interval)


async def watch_disk(ctx: JobContext, handle: JobHandle) -> None:
    """Cancel the job (E_DISK) when the workspace filesystem runs low."""
    floor = ctx.cfg.workspace.min_free_mb
    root = str(ctx.root)
    while True:
        await trio.sleep(DISK_CHECK_S)
        if disk_free_mb(root) < floor:
            log.warning("workspace_disk_low", free_mb=disk_free_mb(root), floor_mb=floor)
            handle.cancel("disk")
            return
