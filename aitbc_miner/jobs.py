"""Drive one job through the lifecycle: ack, check, prepare, run, upload, report.

I/O: coordinator calls, workspace, processes. Decisions come from pure code
(lifecycle table, manifest/allowlist/signature checks); this module only
sequences them, persists state.json before each phase's work, and turns every
failure into an outcome reported to the coordinator. Nothing a job or a
coordinator sends may raise out of `JobRun.run()`.
"""

from __future__ import annotations

import functools
import json
import os
import signal
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
from .cache import ModelCache, fetch_input
from .config import MinerConfig
from .coordinator import CoordinatorClient
from .errors import CoordinatorError, ErrorCode, JobFailure, JobGone, RequestRejected
from .gpu import GpuInfo
from .journal import ArtifactRecord, JobState, current_boot_id, save_state, write_atomic
from .lifecycle import LIVE, Event, Phase, Recovery, advance, failure_event
from .manifest import JOB_ID_RE, Manifest, Signature, job_identity, parse_manifest
from .metrics import Metrics
from .probe import disk_free_mb
from .recovery import kill_leftovers
from .runners import cli as cli_runner
from .runners import python as py_runner
from .runners.base import DEFAULT_PATH, Ending, ProcessResult, Spawn, run_process
from .sandbox.cgroups import CgroupSupport, JobCgroup, limit_files
from .sandbox.limits import LimitPolicy, landlock_rules, process_limits
from .sandbox.spawner import Spawner
from .sandbox.warm import Warm, WarmPool
from .security import SignatureVerifier
from .upload import deliver_result
from .workspace import MIB, Workspace

log = structlog.get_logger(__name__)

LOG_TAIL_BYTES = 4096
DISK_CHECK_S = 0.5
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
    gpus: tuple[str, ...] = ()  # UUIDs of the assigned GPUs
    gpu_indices: tuple[int, ...] = ()  # their NVML indices (usage.gpu)
    slot: str | None = None
    ack_done: trio.Event = field(
        default_factory=trio.Event
    )  # the ack call is over  # "cpu" | "gpu" | None (no slot could be given)

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
    choose_gpus: Callable[[Manifest], tuple[GpuInfo, ...]] | None = None
    cache: ModelCache | None = None  # inputs marked "cache": true (cache.py)
    spawner: Spawner | None = None  # the fork server (limits); None = plain spawn (tests)
    warm: WarmPool | None = None  # job starts prepared ahead (cgroups joined, netns entered)
    sandbox: CgroupSupport = field(default_factory=CgroupSupport)
    limit_policy: LimitPolicy = field(default_factory=LimitPolicy)
    netns: bool = False  # private network namespaces work here (else jobs keep the network)
    landlock: bool = False  # Landlock confines each job's filesystem view
    python_read: tuple[str, ...] = ()  # interpreter, venv, task host, task paths (python jobs)

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
    network: bool = False
    mem_mb: int = 0
    cpu_threads: int | None = None
    read_paths: tuple[str, ...] = ()  # beyond the system dirs (Landlock)


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
        self._check_exit(result, plan)
        return await self._upload(manifest)

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
                req = m.requirements
                raise JobFailure(
                    ErrorCode.NOGPU,
                    f"no {req.gpu_count} GPU(s) with {req.vram_mb} MiB free on this node now",
                )
            self.handle.gpus = tuple(g.uuid for g in chosen)
            self.handle.gpu_indices = tuple(g.index for g in chosen)
            if self.state is not None:  # persisted by the next phase change, before PREP
                self.state = self.state.evolve(gpus=self.handle.gpus)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.handle.gpus)
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
                network=entry.network,
                read_paths=(os.path.dirname(os.path.realpath(entry.path)),),
                mem_mb=m.requirements.mem_mb or self.ctx.cfg.resources.mem_soft_mb,
                cpu_threads=m.requirements.cpu_threads,
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
            network=runners.python.network,
            read_paths=self.ctx.python_read,
            mem_mb=m.requirements.mem_mb or self.ctx.cfg.resources.mem_soft_mb,
            cpu_threads=m.requirements.cpu_threads,
        )

    # -- phases ---------------------------------------------------------------------------

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
                    nursery.start_soon(self._disk_watch)
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

    def _check_exit(self, r: ProcessResult, plan: Plan) -> None:
        failed = r.exit_code != 0
        if r.ending is Ending.EXITED and failed and r.oom_killed:
            raise JobFailure(
                ErrorCode.OOM, f"killed by the OOM killer at its {plan.mem_mb} MiB limit"
            )
        if r.ending is Ending.EXITED and r.signal == signal.SIGXFSZ:
            raise JobFailure(
                ErrorCode.OUTPUT,
                f"wrote a file larger than its {plan.max_output_mb} MiB output cap",
            )
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
        if reason == "disk":
            floor = self.ctx.cfg.workspace.min_free_mb
            return JobFailure(ErrorCode.DISK, f"the workspace filesystem has < {floor} MiB free")
        return JobFailure(
            ErrorCode.CANCELLED,
            f"cancelled ({reason or 'requested'})",
            retryable=reason == "shutdown",
        )

    def _create_workspace(self) -> Workspace:
        ws = Workspace.create(self.ctx.root, self.handle.job_id, self.handle.attempt)
        write_atomic(ws.path / "manifest.json", json.dumps(self.raw).encode(), mode=0o400)
        return ws

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

    def _landlock(self, plan: Plan) -> dict[str, Any]:
        if not self.ctx.landlock or self.ws is None:
            return {}
        return {"landlock": landlock_rules(str(self.ws.path), list(plan.read_paths))}

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

    async def _disk_watch(self) -> None:
        """Cancel the job (E_DISK) when the workspace filesystem runs low."""
        floor = self.ctx.cfg.workspace.min_free_mb
        root = str(self.ctx.root)
        while True:
            await trio.sleep(DISK_CHECK_S)
            if disk_free_mb(root) < floor:
                log.warning("workspace_disk_low", free_mb=disk_free_mb(root), floor_mb=floor)
                self.handle.cancel("disk")
                return

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
