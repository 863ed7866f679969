"""Drive one job through the lifecycle: ack, check, prepare, run, upload, report.

I/O: coordinator calls, workspace, processes. Decisions come from pure code
(lifecycle table, manifest/allowlist/signature checks); this module only
sequences them, persists state.json before each phase's work, and turns every
failure into an outcome reported to the coordinator. Nothing a job or a
coordinator sends may raise out of `JobRun.run()`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import structlog
import trio

from ._trio import unwrap_group
from .allowlist import Allowlist, Denied
from .config import MinerConfig
from .coordinator import CoordinatorClient
from .errors import CoordinatorError, ErrorCode, JobFailure, JobGone, RequestRejected
from .journal import ArtifactRecord, JobState, save_state, write_atomic
from .lifecycle import LIVE, Event, Phase, advance, failure_event
from .manifest import JOB_ID_RE, Manifest, Signature, job_identity, parse_manifest
from .metrics import Metrics
from .runners import cli as cli_runner
from .runners import python as py_runner
from .runners.base import DEFAULT_PATH, Ending, ProcessResult, Spawn, run_process
from .security import SignatureVerifier
from .workspace import MIB, Workspace

log = structlog.get_logger(__name__)

LOG_TAIL_BYTES = 4096
PYTHON_MAX_OUTPUT_MB = 1024  # python tasks have no allowlist entry to cap their output
INPUT_DEFAULT_MAX_MB = 1024


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class JobHandle:
    """What the agent knows about a job in flight (for cancel, heartbeats, slots)."""

    job_id: str
    attempt: int
    gpu: bool
    cancel_event: trio.Event = field(default_factory=trio.Event)
    cancel_reason: str = ""
    phase: Phase = Phase.ACKED
    gpus: tuple[str, ...] = ()
    slot: str | None = None  # "cpu" | "gpu" | None (no slot could be given)

    def cancel(self, reason: str) -> None:
        if not self.cancel_event.is_set():
            self.cancel_reason = reason
            self.cancel_event.set()


@dataclass
class JobContext:
    """Shared by every job of the daemon."""

    cfg: MinerConfig
    node_id: str
    client: CoordinatorClient
    verifier: SignatureVerifier
    allowlist: Callable[[], Allowlist]  # current allowlist (SIGHUP may swap it)
    metrics: Metrics
    downloads: httpx.AsyncClient  # no credentials: inputs come from anywhere
    choose_gpus: Callable[[Manifest], tuple[str, ...]] | None = None

    @property
    def root(self) -> Path:
        return Path(self.cfg.workspace.root)


@dataclass(frozen=True)
class Plan:
    """A checked job: what to execute and under which caps."""

    argv: list[str]
    timeout_s: float
    max_output_mb: int
    env: dict[str, str]


class JobRun:
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
        self._progress_wakeup = trio.Event()

    # -- entry point ------------------------------------------------------------------

    async def run(self) -> Phase:
        job_id, attempt = self.handle.job_id, self.handle.attempt
        structlog.contextvars.bind_contextvars(job_id=job_id)
        try:
            await self.ctx.client.ack(job_id, self.lease_id, attempt)
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
        self.ws = Workspace.create(self.ctx.root, self.handle.job_id, self.handle.attempt)
        write_atomic(self.ws.path / "manifest.json", json.dumps(self.raw).encode(), mode=0o400)
        self.state = JobState(
            job_id=self.handle.job_id,
            attempt=self.handle.attempt,
            phase=Phase.ACKED,
            lease_id=self.lease_id,
            runner=self.runner,
            gpu=self.handle.gpu,
            created_at=time.time(),
            updated_at=time.time(),
        )
        await self._persist()
        manifest = parse_manifest(self.raw)
        plan = self._plan(manifest)
        await self._advance(Event.ACCEPTED)
        await self._interruptible(self._prepare, manifest)
        self.marks["prepared"] = time.monotonic()
        await self._advance(Event.PREPARED)
        result = await self._execute(plan)
        self.marks["ran"] = time.monotonic()
        self._check_exit(result, plan)
        await self._advance(Event.EXITED_OK)
        return await self._upload(manifest, plan, result)

    # -- checks -------------------------------------------------------------------------

    def _plan(self, m: Manifest) -> Plan:
        runners = self.ctx.cfg.runners
        ws = self.ws
        assert ws is not None
        env = {
            "PATH": DEFAULT_PATH,
            "HOME": str(ws.work),
            "TMPDIR": str(ws.tmp),
            "LANG": "C.UTF-8",
            "AITBC_JOB_ID": m.job_id,
            "AITBC_ATTEMPT": str(m.attempt),
            "AITBC_INPUT_DIR": str(ws.input),
            "AITBC_OUTPUT_DIR": str(ws.output),
            "AITBC_WORK_DIR": str(ws.work),
        }
        if m.requirements.gpu:
            has_slot = self.handle.slot == "gpu" and self.ctx.choose_gpus is not None
            chosen = self.ctx.choose_gpus(m) if has_slot else ()
            if not chosen:
                raise JobFailure(
                    ErrorCode.NOGPU, "no GPU on this node meets the job's requirements"
                )
            self.handle.gpus = chosen
            env["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        if m.runner == "cli":
            if not runners.cli.enable:
                raise JobFailure(ErrorCode.DENY, "the cli runner is disabled on this node")
            try:
                entry = self.ctx.allowlist().check(
                    m.command or "", m.args, m.env, max_args=runners.cli.max_args
                )
            except Denied as exc:
                raise JobFailure(ErrorCode.DENY, str(exc)) from None
            env.update(m.env)
            return Plan(
                argv=cli_runner.build_argv(entry, m.args),
                timeout_s=min(m.timeout_s, entry.max_runtime_s),
                max_output_mb=entry.max_output_mb,
                env=env,
            )
        if not runners.python.enable:
            raise JobFailure(ErrorCode.DENY, "the python runner is disabled on this node")
        if m.env:
            raise JobFailure(ErrorCode.DENY, "python tasks take no manifest env keys")
        task = m.task or ""
        py_runner.find_task(task, runners.python.task_paths)
        spec = py_runner.write_task_spec(
            ws.path, task, runners.python.task_paths, m.task_params, ws.output
        )
        return Plan(
            argv=py_runner.build_argv(str(runners.python.venv), spec),
            timeout_s=float(m.timeout_s),
            max_output_mb=PYTHON_MAX_OUTPUT_MB,
            env=env,
        )

    # -- phases ---------------------------------------------------------------------------

    async def _prepare(self, m: Manifest) -> None:
        ws = self.ws
        assert ws is not None
        inputs = m.inputs
        for rel, text in inputs.inline.items():
            ws.write_inline(rel, text)
        for spec in inputs.urls:
            await ws.download(self.ctx.downloads, spec, INPUT_DEFAULT_MAX_MB)
        ws.expose_inputs([*inputs.inline, *(u.path for u in inputs.urls)])

    async def _execute(self, plan: Plan) -> ProcessResult:
        ws = self.ws
        assert ws is not None
        cfg = self.ctx.cfg
        self.handle.phase = Phase.RUNNING
        self.ctx.metrics.running.inc()
        self.state = self.state.evolve(started_at=utcnow()) if self.state else None

        async def started(pgid: int) -> None:
            assert self.state is not None
            self.state = self.state.evolve(pgid=pgid)
            await self._persist()

        try:
            with unwrap_group():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._progress_loop)
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
                            ),
                            cancel=self.handle.cancel_event,
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
                "gpu": list(self.handle.gpus),
            },
        )
        return result

    def _check_exit(self, r: ProcessResult, plan: Plan) -> None:
        if r.ending is Ending.TIMEOUT:
            raise JobFailure(
                ErrorCode.TIMEOUT, f"killed after its time limit of {plan.timeout_s:g} s"
            )
        if r.ending is Ending.CANCELLED:
            raise self._cancel_failure()
        if r.exit_code is None:
            raise JobFailure(ErrorCode.EXIT, f"killed by signal {r.signal}")
        if r.exit_code != 0:
            raise JobFailure(ErrorCode.EXIT, f"exited with code {r.exit_code}")

    def _cancel_failure(self) -> JobFailure:
        reason = self.handle.cancel_reason
        if reason == "lease_lost":
            raise JobGone("lease lost while running", status=409)
        return JobFailure(
            ErrorCode.CANCELLED,
            f"cancelled ({reason or 'requested'})",
            retryable=reason == "shutdown",
        )

    async def _upload(self, m: Manifest, plan: Plan, result: ProcessResult) -> Phase:
        ws = self.ws
        assert ws is not None and self.state is not None
        ws.promote_artifacts(m.artifacts)
        budget = plan.max_output_mb * MIB
        records: list[ArtifactRecord] = []
        with ExitStack() as stack:
            fds: dict[str, int] = {}
            for spec in m.artifacts:
                cap = min(budget, (spec.max_mb or plan.max_output_mb) * MIB)
                fd, size, digest = ws.open_artifact(spec.path, cap)
                stack.callback(os.close, fd)
                budget -= size
                fds[spec.path] = fd
                records.append(ArtifactRecord(spec.path, spec.type, size, digest))
            key = str(uuid.uuid4())
            self.state = self.state.evolve(artifacts=tuple(records), final_key=key)
            await self._persist()
            metadata = {
                "job_id": m.job_id,
                "node_id": self.ctx.node_id,
                "attempt": m.attempt,
                "exit_code": result.exit_code,
                "started_at": self.state.started_at,
                "finished_at": self.state.finished_at,
                "duration_s": result.wall_s,
                "usage": self.state.usage,
                "artifacts": [
                    {
                        "path": a.path,
                        "type": a.type,
                        "size": a.size,
                        "sha256": a.sha256,
                        "upload_id": None,
                    }
                    for a in records
                ],
            }

            def body(attempt_stack: ExitStack) -> dict[str, Any]:
                # metadata is a part of its own so the body is multipart even
                # with no artifacts (data= alone would be url-encoded).
                parts: list[tuple[str, Any]] = [
                    ("metadata", (None, json.dumps(metadata), "application/json"))
                ]
                for rec in records:
                    fh = attempt_stack.enter_context(open(fds[rec.path], "rb", closefd=False))
                    fh.seek(0)
                    parts.append(("artifact", (rec.path, fh, rec.type)))
                return {"files": parts}

            try:
                await self.ctx.client.result(body, idempotency_key=key)
            except RequestRejected as exc:
                raise JobFailure(
                    ErrorCode.OUTPUT, f"result refused: HTTP {exc.status}: {exc.body[:300]}"
                ) from None
        self.ctx.metrics.upload_bytes.inc(sum(r.size for r in records))
        self.state = self.state.evolve(confirmed=True)
        await self._save_event(Event.UPLOADED)
        return self._finished(Phase.DONE, None, "")

    # -- failure reporting ----------------------------------------------------------------

    async def _report_failure(self, failure: JobFailure) -> Phase:
        phase_event = failure_event(failure.retryable)
        key = str(uuid.uuid4())
        if self.state is not None:
            self.state = self.state.evolve(
                error_code=failure.code.value, error_msg=failure.message[:1000], final_key=key
            )
            await self._save_event(phase_event)
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

    # -- helpers ---------------------------------------------------------------------------

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


def job_handle_for(raw: dict[str, Any]) -> JobHandle | None:
    ident = job_identity(raw)
    if ident is None:
        return None
    requirements = raw.get("requirements")
    gpu = isinstance(requirements, dict) and requirements.get("gpu") is True
    return JobHandle(job_id=ident[0], attempt=ident[1], gpu=gpu)
