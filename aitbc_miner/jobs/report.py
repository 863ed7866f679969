"""JobRun part: durable state, artifact upload, the failure report, the job's last line.

For: collecting the declared artifacts (moved, opened, capped and hashed in a thread),
persisting them with the result's idempotency key in one UPLOADING write, delivering
the result (resumable, through upload.deliver_result) and confirming it; recording a
failure before reporting it (once, under one key) and the report itself with the exec
log's tail; the lifecycle moves journaled to state.json; giving a job up when it is
no longer ours; and the one ``job_finished`` line with its metrics.
I/O: state.json (atomic writes, in a thread), artifact files, coordinator calls.
Must not: send a final call whose key and outcome are not yet in state.json, or
raise a coordinator's refusal of a failure report (it is logged; the job ends).
"""

from __future__ import annotations

import os
import time
import uuid
from contextlib import ExitStack

import structlog
import trio

from ..errors import CoordinatorError, ErrorCode, JobFailure, JobGone, RequestRejected
from ..journal import ArtifactRecord, JobState, save_state
from ..lifecycle import LIVE, Event, Phase, advance, failure_event
from ..manifest import Manifest
from ..upload import deliver_result
from ..workspace import MIB
from .checks import PYTHON_MAX_OUTPUT_MB
from .model import JobParts

log = structlog.get_logger(__name__)

LOG_TAIL_BYTES = 4096


class Reporting(JobParts):
    """Upload, failure report, journal, final line (a part of JobRun)."""

    # -- upload ----------------------------------------------------------------------------

    def _collect(
        self, m: Manifest, cap_mb: int, stack: ExitStack
    ) -> tuple[list[ArtifactRecord], dict[str, int]]:
        """Move, open and hash the declared artifacts (blocking: run in a thread)."""
        ws = self.ws
        assert ws is not None
        ws.promote_artifacts(m.artifacts)
        budget = cap_mb * MIB
        records: list[ArtifactRecord] = []
        fds: dict[str, int] = {}
        for spec in m.artifacts:
            cap = min(budget, (spec.max_mb or cap_mb) * MIB)
            fd, size, digest = ws.open_artifact(spec.path, cap)
            stack.callback(os.close, fd)
            budget -= size
            fds[spec.path] = fd
            records.append(ArtifactRecord(spec.path, spec.type, size, digest))
        return records, fds

    async def _upload(self, m: Manifest) -> Phase:
        """Collect artifacts (sizes capped while hashing), persist them, deliver."""
        state = self.state
        assert state is not None
        cap_mb = state.max_output_mb or PYTHON_MAX_OUTPUT_MB
        with ExitStack() as stack:
            # Hashing a big artifact must not stall the event loop (heartbeats, /healthz).
            records, fds = await trio.to_thread.run_sync(self._collect, m, cap_mb, stack)
            # One write for "exited OK" and what to upload under which key.
            phase = (
                advance(state.phase, Event.EXITED_OK)
                if state.phase is Phase.RUNNING
                else state.phase
            )
            self.handle.phase = phase
            self.state = state.evolve(
                phase=phase, artifacts=tuple(records), final_key=str(uuid.uuid4())
            )
            await self._persist()
            return await self._deliver(fds)

    async def _deliver(self, fds: dict[str, int]) -> Phase:
        assert self.state is not None
        cfg = self.ctx.cfg

        async def save(state: JobState) -> None:
            self.state = state
            await self._persist()

        try:
            self.state = await deliver_result(
                self.ctx.client,
                self.state,
                fds,
                chunk_threshold=int(cfg.upload.chunk_threshold_mb * MIB),
                metrics=self.ctx.metrics,
                save=save,
            )
        except RequestRejected as exc:
            raise JobFailure(
                ErrorCode.OUTPUT, f"result refused: HTTP {exc.status}: {exc.body[:300]}"
            ) from None
        self.state = self.state.evolve(confirmed=True)
        await self._save_event(Event.UPLOADED)
        return self._finished(Phase.DONE, None, "")

    # -- failure reporting ----------------------------------------------------------------

    async def _report_failure(self, failure: JobFailure) -> Phase:
        if self.state is not None:
            if self.state.phase in LIVE:
                self.state = self.state.evolve(
                    error_code=failure.code.value,
                    error_msg=failure.message[:1000],
                    final_key=str(uuid.uuid4()),
                    retryable=failure.retryable,
                )
                await self._save_event(failure_event(failure.retryable))
            key = self.state.final_key
        else:
            key = str(uuid.uuid4())
        assert key is not None
        return await self._send_fail(failure, key)

    async def _send_fail(self, failure: JobFailure, key: str) -> Phase:
        final = Phase.RETRY_WAIT if failure.retryable else Phase.FAILED
        body = {
            "job_id": self.handle.job_id,
            "node_id": self.ctx.node_id,
            "attempt": self.handle.attempt,
            "error_code": failure.code.value,
            "error_msg": failure.message[:1000],
            "retryable": failure.retryable,
            "logs_ref": str(self.ws.exec_log) if self.ws and self.ws.exec_log.exists() else None,
            "logs_tail": self._log_tail(),
        }
        try:
            await self.ctx.client.fail(body, idempotency_key=key)
        except JobGone as exc:
            log.warning("fail_refused_job_gone", error=str(exc))
            final = Phase.ABANDONED
        except CoordinatorError as exc:
            log.error("fail_report_rejected", error=str(exc))
        if self.state is not None:
            self.state = self.state.evolve(confirmed=True)
            await self._persist()
        return self._finished(final, failure.code, failure.message)

    def _log_tail(self) -> str:
        if self.ws is None:
            return ""
        try:
            with open(self.ws.exec_log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - LOG_TAIL_BYTES))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # -- durable state ---------------------------------------------------------------------

    async def _advance(self, event: Event) -> None:
        await self._save_event(event)

    async def _save_event(self, event: Event) -> None:
        assert self.state is not None
        phase = advance(self.state.phase, event)
        self.handle.phase = phase
        self.state = self.state.evolve(phase=phase)
        await self._persist()

    async def _abandon(self, reason: str) -> None:
        """The job is no longer ours: keep the workspace, report nothing more."""
        if self.state is None:
            return
        phase = self.state.phase
        if phase in LIVE:
            phase = advance(phase, Event.LEASE_LOST)
        self.state = self.state.evolve(phase=phase, confirmed=True, error_msg=reason[:500])
        await self._persist()

    async def _persist(self) -> None:
        assert self.state is not None and self.ws is not None
        now = time.time()
        times = dict(self.state.phase_times)
        times.setdefault(self.state.phase.value, now)
        self.state = self.state.evolve(updated_at=now, phase_times=times)
        state, path = self.state, self.ws.path
        await trio.to_thread.run_sync(save_state, path, state)

    def _finished(self, phase: Phase, code: ErrorCode | None, message: str) -> Phase:
        self.handle.phase = phase
        total = time.monotonic() - self.t0
        acked = self.marks.get("acked", self.t0)
        prepared = self.marks.get("prepared", acked)
        ran = self.marks.get("ran", prepared)
        outcome = {
            Phase.DONE: "done",
            Phase.FAILED: "failed",
            Phase.RETRY_WAIT: "retry_wait",
        }.get(phase, "abandoned")
        self.ctx.metrics.jobs.labels(
            outcome=outcome, code=code.value if code else "", runner=self.runner
        ).inc()
        self.ctx.metrics.job_duration.labels(runner=self.runner).observe(total)
        state = self.state
        log.info(
            "job_finished",
            outcome=outcome,
            error_code=code.value if code else None,
            error_msg=message[:500] or None,
            attempt=self.handle.attempt,
            runner=self.runner,
            exit_code=state.exit_code if state else None,
            duration_s=round(total, 4),
            prep_s=round(prepared - acked, 4),
            run_s=round(ran - prepared, 4) if "ran" in self.marks else None,
            report_s=round(time.monotonic() - ran, 4),
            usage=state.usage if state else None,
            artifacts=len(state.artifacts) if state else 0,
            workspace=str(self.ws.path) if self.ws else None,
        )
        return phase
