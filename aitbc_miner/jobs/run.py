"""Drive one job through the lifecycle: ack, check, prepare, run, upload, report.

For: :class:`JobRun`, whose :meth:`~JobRun.run` takes a freshly leased job through
ack, signature and manifest checks, PREP (inputs), RUNNING and UPLOADING, and whose
:meth:`~JobRun.recover` finishes what a crash interrupted (DESIGN.md "Lifecycle").
This module holds the sequence and its durability order: the cgroup is recorded by
the PREPARED save before anything runs in it, and the shielded ``finally`` gives back
the warm start and removes the cgroup whatever happened from the cgroup's creation on.
I/O: coordinator calls, workspace, processes (through the parts: checks, execute,
report). Decisions come from pure code (lifecycle table, manifest/allowlist/signature
checks); every failure becomes an outcome reported to the coordinator.
Must not: let anything a job or a coordinator sends raise out of ``JobRun.run()``.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import trio

from ..errors import CoordinatorError, ErrorCode, JobFailure, JobGone
from ..journal import JobState, current_boot_id, write_atomic
from ..lifecycle import Event, Phase, Recovery
from ..manifest import JOB_ID_RE, Manifest, Signature, parse_manifest
from ..recovery import kill_leftovers
from ..sandbox.cgroups import JobCgroup
from ..sandbox.warm import Warm
from ..workspace import Workspace
from .checks import check_exit, claim_gpus, job_env, runner_plan
from .execute import Execution
from .model import JobContext, JobHandle, Plan
from .report import Reporting

log = structlog.get_logger(__name__)


class JobRun(Execution, Reporting):
    """One job, from its ack (or its workspace after a crash) to its final report."""

    def __init__(
        self,
        ctx: JobContext,
        raw: dict[str, Any],
        lease_id: str,
        signature: Signature | None,
        handle: JobHandle,
    ) -> None:
        self.ctx = ctx
        self.raw = raw
        self.lease_id = lease_id
        self.signature = signature
        self.handle = handle
        self.ws: Workspace | None = None
        self.state: JobState | None = None
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}
        self.runner = str(raw.get("runner", "?"))[:16]
        self._progress: tuple[int, str] | None = None
        self.cgroup: JobCgroup | None = None
        self.warm: Warm | None = None  # the prepared start this job took, if any
        self._progress_wakeup = trio.Event()

    # -- entry point ------------------------------------------------------------------

    @classmethod
    def for_recovery(cls, ctx: JobContext, job_dir: Path, state: JobState) -> JobRun:
        """A JobRun that picks up a job found in the workspace at start-up."""
        try:
            raw = json.loads((job_dir / "manifest.json").read_bytes())
        except (OSError, ValueError):
            raw = {}
        handle = JobHandle(job_id=state.job_id, attempt=state.attempt, gpu=state.gpu)
        handle.phase = state.phase
        run = cls(ctx, raw if isinstance(raw, dict) else {}, state.lease_id or "", None, handle)
        run.ws = Workspace(job_dir)
        run.state = state
        run.runner = state.runner
        return run

    async def recover(self, action: Recovery) -> Phase:
        """Finish what a crash interrupted (DESIGN.md "Lifecycle")."""
        state, ws = self.state, self.ws
        assert state is not None and ws is not None
        structlog.contextvars.bind_contextvars(job_id=state.job_id)
        log.info("job_recovering", phase=state.phase.value, action=action.value)
        try:
            if action is Recovery.KILL_AND_REPORT_CRASH:
                if state.cgroup is not None and self.ctx.sandbox.active:
                    group = JobCgroup.from_recorded(state.cgroup, self.ctx.sandbox)
                    await trio.to_thread.run_sync(group.kill)
                    await trio.to_thread.run_sync(group.remove)
                await trio.to_thread.run_sync(kill_leftovers, state, ws.path)
                return await self._report_failure(
                    JobFailure(
                        ErrorCode.CRASH,
                        f"the miner restarted while the job was {state.phase.value}",
                    )
                )
            if action is Recovery.RESUME_UPLOAD and state.final_key is None:
                return await self._upload(parse_manifest(self.raw))
            if action is Recovery.RESUME_UPLOAD or state.phase is Phase.DONE:
                with ExitStack() as stack:
                    fds = {}
                    for rec in state.artifacts:
                        fds[rec.path] = ws.open_recorded(rec.path, rec.size)
                        stack.callback(os.close, fds[rec.path])
                    return await self._deliver(fds)
            assert state.final_key is not None
            try:
                code = ErrorCode(state.error_code)
            except ValueError:
                code = ErrorCode.CRASH
            failure = JobFailure(code, state.error_msg or "", retryable=state.retryable)
            return await self._send_fail(failure, state.final_key)
        except JobFailure as failure:
            return await self._report_failure(failure)
        except JobGone as exc:
            await self._abandon(str(exc))
            return self._finished(Phase.ABANDONED, None, str(exc))

    async def run(self) -> Phase:
        job_id, attempt = self.handle.job_id, self.handle.attempt
        structlog.contextvars.bind_contextvars(job_id=job_id)
        try:
            try:
                await self.ctx.client.ack(job_id, self.lease_id, attempt)
            finally:
                self.handle.ack_done.set()
        except JobGone as exc:
            return self._finished(Phase.ABANDONED, None, f"ack refused: {exc}")
        except CoordinatorError as exc:
            log.error("ack_failed", error=str(exc))
            return self._finished(Phase.ABANDONED, None, f"ack failed: {exc}")
        self.marks["acked"] = time.monotonic()
        try:
            return await self._drive()
        except JobFailure as failure:
            return await self._report_failure(failure)
        except JobGone as exc:
            await self._abandon(str(exc))
            return self._finished(Phase.ABANDONED, None, str(exc))

    async def _drive(self) -> Phase:
        now = datetime.now(UTC)
        self.ctx.verifier.verify(self.raw, self.signature, node_id=self.ctx.node_id, now=now)
        if not isinstance(self.raw.get("job_id"), str) or not JOB_ID_RE.fullmatch(
            self.raw["job_id"]
        ):
            raise JobFailure(
                ErrorCode.INVALID, "job_id must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
            )
        self.ws = await trio.to_thread.run_sync(self._create_workspace)
        self.state = JobState(
            job_id=self.handle.job_id,
            attempt=self.handle.attempt,
            phase=Phase.ACKED,
            lease_id=self.lease_id,
            runner=self.runner,
            gpu=self.handle.gpu,
            created_at=time.time(),
            updated_at=time.time(),
            boot_id=current_boot_id(),
        )
        # ACKED is not journaled on its own: its work (the checks below) has no
        # side effects, and recovery would treat it like PREP, which is written
        # next. A crash in between leaves a workspace without state (quarantined
        # at start) and a lease that expires at the coordinator.
        manifest = parse_manifest(self.raw)
        plan = self._plan(manifest)
        self.state = self.state.evolve(max_output_mb=plan.max_output_mb)
        await self._advance(Event.ACCEPTED)
        await self._interruptible(self._prepare, manifest)
        self.marks["prepared"] = time.monotonic()
        try:
            await self._make_cgroup(plan)  # recorded by the save below, before anything runs in it
            await self._advance(Event.PREPARED)
            result = await self._execute(plan)
        finally:
            with trio.CancelScope(shield=True):
                if self.warm is not None and self.ctx.warm is not None:
                    await self.ctx.warm.forget(self.warm)  # its stem, if the job never used it
                if self.cgroup is not None:
                    await trio.to_thread.run_sync(self.cgroup.remove)
        self.marks["ran"] = time.monotonic()
        check_exit(result, plan, self.handle.cancel_reason, self.ctx.cfg.workspace.min_free_mb)
        return await self._upload(manifest)

    # -- checks -------------------------------------------------------------------------

    def _plan(self, m: Manifest) -> Plan:
        ws = self.ws
        assert ws is not None
        env = job_env(m, ws)
        if m.requirements.gpu:
            env.update(claim_gpus(self.ctx, self.handle, m))
            if self.state is not None:  # persisted by the next phase change, before PREP
                self.state = self.state.evolve(gpus=self.handle.gpus)
        return runner_plan(self.ctx, m, ws, env)

    def _create_workspace(self) -> Workspace:
        ws = Workspace.create(self.ctx.root, self.handle.job_id, self.handle.attempt)
        write_atomic(ws.path / "manifest.json", json.dumps(self.raw).encode(), mode=0o400)
        return ws
