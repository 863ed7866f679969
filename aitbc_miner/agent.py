"""The daemon's one nursery owner: register, heartbeat, pull, run jobs, drain.

I/O: orchestration only. Each long-lived loop is a function in this module;
job work lives in jobs.py, wire details in coordinator.py, decisions in pure
modules. Signals: the first SIGTERM/SIGINT drains (stop pulling, heartbeat
`draining`, let jobs finish up to `shutdown.grace_s`, cancel the rest,
deregister, exit 0); a second one cancels running jobs at once.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import structlog
import trio

from . import __version__, inputs, probe, systemd, watchdog
from ._trio import unwrap_group
from .allowlist import Allowlist, AllowlistError, load_allowlist
from .backoff import Backoff, jittered
from .cache import open_cache
from .config import MinerConfig
from .coordinator import CoordinatorClient
from .errors import CoordinatorError, CoordinatorUnavailable, NodeRejected
from .gpu import (
    GpuInfo,
    GpuInventory,
    NoGpuFree,
    choose_gpus,
    device_slots_free,
    effective_free_mb,
    vram_offers,
)
from .gpu_sweep import JobMark
from .gpu_sweep import sweep as sweep_gpus
from .health import serve_health
from .jobs import JobContext, JobHandle, JobRun, job_handle_for
from .journal import load_state
from .lifecycle import Recovery
from .manifest import Manifest, PullReply, RegisterReply
from .metrics import Metrics
from .recovery import Found, scan, sweep
from .runners import python as py_runner
from .sandbox.cgroups import detect
from .sandbox.limits import LimitPolicy
from .sandbox.spawner import ForkServer
from .sandbox.warm import WarmPool
from .security import SignatureVerifier

log = structlog.get_logger(__name__)

REPORT_BOUND_S = 30.0  # after the drain deadline, how long final reports may still take
DISK_RECHECK_S = 5.0  # while the workspace filesystem is too full to take jobs


class Agent:
    def __init__(
        self,
        cfg: MinerConfig,
        allowlist: Allowlist,
        *,
        nvml: Any = None,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        early_signals: list[int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.metrics = Metrics()
        self.rng = rng or random.Random()
        self._allowlist = allowlist
        self.inventory = GpuInventory(nvml, enabled=cfg.gpu.enable)
        self.gpus: list[GpuInfo] = self.inventory.snapshot()
        self.gpu_in_use: dict[str, int] = {}  # uuid -> jobs placed on it
        self.sandbox = detect(cfg.resources.cgroup)  # raises CgroupUnavailable when required
        self.forkserver = ForkServer()
        self.warm: WarmPool | None = None
        self.disk_low = False
        self._early_signals = early_signals if early_signals is not None else []
        self._inflight_pull: tuple[trio.CancelScope, dict[str, Any]] | None = None
        self.gpu_reserved_mb: dict[str, int] = {}  # uuid -> VRAM those jobs asked for
        self._gpu_claims: dict[str, tuple[tuple[str, ...], int]] = {}  # job_id -> (uuids, MiB)
        coord = cfg.coordinator
        self.client = CoordinatorClient(
            base_url=coord.base_url,
            bootstrap_token=coord.auth_token.get_secret_value(),
            node_id=self.node_id,
            timeout_s=coord.timeout_s,
            tls_verify=coord.tls_verify
            if isinstance(coord.tls_verify, bool)
            else str(coord.tls_verify),
            backoff_min_s=cfg.heartbeat.backoff.min_s,
            backoff_max_s=cfg.heartbeat.backoff.max_s,
            max_response_bytes=coord.max_response_bytes,
            metrics=self.metrics,
            rng=self.rng,
            transport=transport,
            descriptor=self.descriptor,
            on_register=self._on_register,
        )
        self.node_status = "unregistered"  # pending | active | disabled | rejected
        self.draining = False
        self.jobs: dict[str, JobHandle] = {}
        self.cpu_used = 0
        self.gpu_used = 0
        self.heartbeat_interval = cfg.heartbeat.interval_s
        self.last_heartbeat_ok: float | None = None
        # Watchdog rule inputs (watchdog.py): READY sent, and the heartbeat loop's last
        # progress mark with the wait it announced before its next attempt.
        self.ready_sent = False
        self.last_loop_progress: float | None = None
        self.next_heartbeat_in_s = 0.0
        self.health_urls: list[str] = []
        self._changed = trio.Event()
        self._heartbeat_now = trio.Event()
        self._startup_scope = trio.CancelScope()
        self._pull_scope = trio.CancelScope()
        self._jobs_scope: trio.CancelScope | None = None
        self._recovery_scope = trio.CancelScope()
        self.recovering: dict[str, trio.Event] = {}
        self._root: trio.Nursery | None = None
        self._forced = False
        self.metrics.slots_total.labels(kind="cpu").set(cfg.resources.max_concurrent_cpu)
        self.metrics.slots_total.labels(kind="gpu").set(self.gpu_capacity)

    # -- capacity -----------------------------------------------------------------------

    @property
    def gpu_capacity(self) -> int:
        usable = sum(1 for g in self.gpus if g.schedulable)
        return min(self.cfg.resources.max_concurrent_gpu, usable * self.cfg.gpu.jobs_per_gpu)

    @property
    def cpu_free(self) -> int:
        return max(0, self.cfg.resources.max_concurrent_cpu - self.cpu_used)

    @property
    def gpu_free(self) -> int:
        return max(0, self.gpu_capacity - self.gpu_used)

    def runners(self) -> list[str]:
        r = self.cfg.runners
        return [name for name, on in (("cli", r.cli.enable), ("python", r.python.enable)) if on]

    def descriptor(self) -> dict[str, Any]:
        return probe.descriptor(
            node_id=self.node_id,
            gpus=self.gpus,
            runners=self.runners(),
            slots={"cpu": self.cfg.resources.max_concurrent_cpu, "gpu": self.gpu_capacity},
            workspace_root=str(self.cfg.workspace.root),
        )

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        running = sum(1 for h in self.jobs.values() if h.phase.value == "RUNNING")
        self.metrics.slots_used.labels(kind="cpu").set(self.cpu_used)
        self.metrics.slots_used.labels(kind="gpu").set(self.gpu_used)
        self.metrics.queued.set(len(self.jobs) - running)
        systemd.notify(
            f"STATUS=running {running}, queued {len(self.jobs) - running}, {self.node_status}"
        )

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    # -- status for /healthz and /readyz ------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        age = None if self.last_heartbeat_ok is None else round(now - self.last_heartbeat_ok, 3)
        fresh = age is not None and age < max(3 * self.heartbeat_interval, 10.0)
        ready = self.node_status == "active" and not self.draining and fresh
        running = sum(1 for h in self.jobs.values() if h.phase.value == "RUNNING")
        return {
            "status": "draining" if self.draining else self.node_status,
            "alive": self.loop_verdict().healthy,
            "ready": ready,
            "node_id": self.node_id,
            "registered": self.client.registered,
            "last_heartbeat_age_s": age,
            "running": running,
            "queued": len(self.jobs) - running,
            "slots": {
                "cpu": [self.cpu_used, self.cfg.resources.max_concurrent_cpu],
                "gpu": [self.gpu_used, self.gpu_capacity],
            },
            "cpu_load": round(os.getloadavg()[0], 2),
            "vram_free_mb": [g.vram_free_mb for g in self.gpus if g.schedulable],
            "version": __version__,
            "sandbox": self.sandbox_status(),
        }

    # -- watchdog (rule in watchdog.py) ------------------------------------------------------

    def mark_loop_progress(self, next_in_s: float) -> None:
        """The heartbeat loop finished an attempt and will try again within next_in_s."""
        self.last_loop_progress = time.monotonic()
        self.next_heartbeat_in_s = next_in_s

    def watchdog_progress(self) -> watchdog.Progress:
        return watchdog.Progress(
            ready=self.ready_sent,
            rejected=self.node_status == "rejected",
            last_progress=self.last_loop_progress,
            next_in_s=self.next_heartbeat_in_s,
            attempt_budget_s=watchdog.attempt_budget(self.cfg.coordinator.timeout_s),
        )

    def loop_verdict(self) -> watchdog.Verdict:
        return watchdog.verdict(self.watchdog_progress(), time.monotonic())

    # -- lifetime -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(node_id=self.node_id)
        downloads = inputs.download_client(
            self.cfg.coordinator.timeout_s, allow_private=self.cfg.security.allow_private_inputs
        )
        try:
            with unwrap_group():
                async with trio.open_nursery() as root:
                    self._root = root
                    root.start_soon(self._signal_loop)
                    if self.cfg.health.listen:
                        self.health_urls = await root.start(
                            serve_health,
                            self.cfg.health.listen,
                            self.status,
                            self.metrics.registry if self.cfg.health.enable_metrics else None,
                        )
                    log.info(
                        "miner_started",
                        version=__version__,
                        health=self.health_urls,
                        coordinator=self.cfg.coordinator.base_url,
                        gpus=len(self.gpus),
                        gpu_reason=self.inventory.reason or None,
                        slots={
                            "cpu": self.cfg.resources.max_concurrent_cpu,
                            "gpu": self.gpu_capacity,
                        },
                        runners=self.runners(),
                        workspace=str(self.cfg.workspace.root),
                    )
                    await self.forkserver.open()
                    self._log_sandbox()
                    if self.sandbox.active and self.cfg.resources.warm_starts:
                        slots = self.cfg.resources.max_concurrent_cpu + self.gpu_capacity
                        self.warm = WarmPool(
                            self.sandbox,
                            self.forkserver,
                            netns=self.forkserver.netns == "ok",
                            size=2 if slots > 1 else 1,
                        )
                        root.start_soon(self.warm.run)
                    task_status.started()
                    if systemd.available():
                        root.start_soon(watchdog.watchdog_loop, self.watchdog_progress)
                    with self._startup_scope:
                        await self._register_until_done()
                    if self.client.registered and not self.draining:
                        systemd.notify("READY=1")
                        self.ready_sent = True
                        self.mark_loop_progress(0.0)
                        root.start_soon(self._heartbeat_loop)
                        root.start_soon(self._sweep_loop)
                        await self._serve_jobs(self._job_context(downloads))
                        await self._deregister()
                    root.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.forkserver.aclose()
                await downloads.aclose()
                await self.client.aclose()
        log.info("miner_stopped")

    def sandbox_status(self) -> dict[str, Any]:
        enforced = dict(self.sandbox.enforced())
        enforced["network"] = (
            "private namespace (loopback only)" if self.forkserver.netns == "ok" else "NOT ISOLATED"
        )
        enforced["filesystem"] = (
            f"landlock ABI {self.forkserver.landlock_abi} (own workspace + system dirs)"
            if self.cfg.resources.landlock and self.forkserver.landlock_abi > 0
            else "NOT CONFINED (uid and file modes only)"
        )
        enforced["signals"] = (
            "own processes only (landlock scope)"
            if self.cfg.resources.landlock and self.forkserver.landlock_abi >= 6
            else "NOT SCOPED (any process of the daemon's uid)"
        )
        enforced["rlimits"] = "nofile, nproc, fsize, core=0; no_new_privs; nice/ionice"
        return enforced

    def _log_sandbox(self) -> None:
        status = self.sandbox_status()
        log.info(
            "sandbox",
            **status,
            cgroup_mode=self.cfg.resources.cgroup,
            reason=self.sandbox.reason or None,
        )
        if self.sandbox.active and not self.sandbox.favordynmods:
            log.info(
                "cgroup_moves_slow",
                detail="moving a process into a cgroup waits ~10-20 ms for the kernel here; "
                "job starts are prepared ahead so jobs do not wait, except cold starts "
                "(network: true jobs, more jobs at once than spares). Mount cgroup2 with "
                "favordynmods (or boot with cgroup_favordynmods=true) to make it ~0.3 ms",
            )
        if self.forkserver.netns != "ok":
            log.warning(
                "network_isolation_unavailable",
                detail="jobs whose allowlist entry says network: false will still reach the "
                "network: this host allows neither user nor network namespaces",
            )

    def _job_context(self, downloads: httpx.AsyncClient) -> JobContext:
        sec = self.cfg.security
        verifier = SignatureVerifier.from_config(
            sec.manifest_keys,
            {k: v.get_secret_value() for k, v in sec.hmac_keys.items()},
            sec.require_signed_manifests,
        )
        return JobContext(
            cfg=self.cfg,
            node_id=self.node_id,
            client=self.client,
            verifier=verifier,
            allowlist=lambda: self._allowlist,
            metrics=self.metrics,
            downloads=downloads,
            choose_gpus=self._choose_gpus,
            spawner=self.forkserver,
            warm=self.warm,
            sandbox=self.sandbox,
            limit_policy=LimitPolicy(
                cpu_nice=self.cfg.resources.cpu_nice,
                io_class=self.cfg.resources.io_class,
                io_level=self.cfg.resources.io_level,
                max_open_files=self.cfg.resources.max_open_files,
                max_processes=self.cfg.resources.max_processes,
            ),
            netns=self.forkserver.netns == "ok",
            landlock=self.cfg.resources.landlock and self.forkserver.landlock_abi > 0,
            python_read=python_read_paths(self.cfg),
            cache=open_cache(
                self.cfg.cache.root, self.cfg.cache.max_gb, self.cfg.cache.pinned, self.metrics
            ),
        )

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

    # -- registration & heartbeat ----------------------------------------------------------

    def _on_register(self, reply: RegisterReply) -> None:
        if reply.heartbeat_interval_s:
            self.heartbeat_interval = reply.heartbeat_interval_s
        self._set_status(reply.status)
        log.info(
            "registered",
            status=reply.status,
            heartbeat_interval_s=self.heartbeat_interval,
            token_expires_at=reply.expires_at,
        )

    def _set_status(self, status: str) -> None:
        if status != self.node_status:
            log.info("node_status", old=self.node_status, new=status)
            self.node_status = status
            self._changed_now()

    async def _register_until_done(self) -> None:
        backoff = Backoff(
            self.cfg.heartbeat.backoff.max_s, self.cfg.heartbeat.backoff.max_s, self.rng
        )
        while True:
            try:
                await self.client.register(retry=True)
                return
            except NodeRejected as exc:
                self._set_status("rejected")
                delay = backoff.next()
                log.error("register_rejected", error=str(exc), retry_in_s=round(delay, 1))
            except CoordinatorError as exc:
                delay = backoff.next()
                log.error("register_failed", error=str(exc), retry_in_s=round(delay, 1))
            await trio.sleep(delay)

    def heartbeat_body(self, seq: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "node_id": self.node_id,
            "seq": seq,
            "state": "draining" if self.draining else "active",
        }
        body.update(probe.load_figures(str(self.cfg.workspace.root)))
        body["gpu_free"] = [
            g.free_entry(effective_free_mb(g, self.gpu_reserved_mb))
            for g in self.gpus
            if g.schedulable
        ]
        body["running_jobs"] = sorted(self.jobs)
        return body

    async def _heartbeat_loop(self) -> None:
        hb = self.cfg.heartbeat
        backoff = Backoff(hb.backoff.min_s, hb.backoff.max_s, self.rng)
        seq = 0
        while True:
            seq += 1
            if self.inventory.active:  # NVML errors mark devices unavailable, never stop this
                self.gpus = await trio.to_thread.run_sync(self.inventory.snapshot)
                self._export_gpu_metrics()
            try:
                await self._renew_token_if_due()
                reply = await self.client.heartbeat(self.heartbeat_body(seq))
            except NodeRejected as exc:
                self._set_status("rejected")
                self.metrics.heartbeats.labels(result="error").inc()
                delay = hb.backoff.max_s
                log.error("heartbeat_rejected", error=str(exc), retry_in_s=delay)
            except CoordinatorError as exc:
                self.metrics.heartbeats.labels(result="error").inc()
                retry_after = exc.retry_after if isinstance(exc, CoordinatorUnavailable) else None
                delay = backoff.next(retry_after)
                log.warning("heartbeat_failed", error=str(exc), retry_in_s=round(delay, 2))
            else:
                backoff.reset()
                self.last_heartbeat_ok = time.monotonic()
                self.metrics.heartbeats.labels(result="ok").inc()
                self.metrics.heartbeat_last_success.set(time.time())
                self._set_status(reply.status)
                for job_id in reply.cancel:
                    handle = self.jobs.get(job_id)
                    if handle is not None:
                        log.info("job_cancel_requested", job_id=job_id, source="heartbeat")
                        handle.cancel("coordinator")
                delay = jittered(self.heartbeat_interval, hb.jitter_pct, self.rng)
            self.mark_loop_progress(delay)
            self._heartbeat_now = trio.Event()
            with trio.move_on_after(delay):
                await self._heartbeat_now.wait()

    async def _renew_token_if_due(self) -> None:
        expires = self.client.token_expires_at
        if expires is not None and expires - time.time() < 2 * self.heartbeat_interval + 5:
            log.info("node_token_renewing", expires_in_s=round(expires - time.time(), 1))
            await self.client.register(retry=False)

    def _export_gpu_metrics(self) -> None:
        self.metrics.export_gpus(self.gpus)

    async def _deregister(self) -> None:
        with trio.move_on_after(self.cfg.coordinator.timeout_s) as scope:
            try:
                await self.client.deregister()
                log.info("deregistered")
            except CoordinatorError as exc:
                log.warning("deregister_failed", error=str(exc))
        if scope.cancelled_caught:
            log.warning("deregister_timed_out")

    # -- pulling and running jobs --------------------------------------------------------------

    async def _serve_jobs(self, ctx: JobContext) -> None:
        with unwrap_group():
            async with trio.open_nursery() as jobs:
                self._jobs_scope = jobs.cancel_scope
                await self._start_recovery(ctx, jobs)
                with self._pull_scope:
                    await self._pull_loop(ctx, jobs)
        self._jobs_scope = None

    # -- crash recovery and retention ----------------------------------------------------------

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

    def _may_pull(self) -> bool:
        return self.node_status == "active" and (self.cpu_free > 0 or self.gpu_free > 0)

    def pull_filters(self) -> dict[str, Any]:
        jpg = self.cfg.gpu.jobs_per_gpu
        return {
            "runners": self.runners(),
            "cpu_slots_free": self.cpu_free,
            "gpu_slots_free": min(
                self.gpu_free, device_slots_free(self.gpus, self.gpu_in_use, jpg)
            ),
            "vram_free_mb": vram_offers(self.gpus, self.gpu_in_use, jpg, self.gpu_reserved_mb),
            "tags": self.descriptor_tags(),
        }

    def descriptor_tags(self) -> list[str]:
        return ["cuda", "cpu"] if any(g.schedulable for g in self.gpus) else ["cpu"]

    async def _disk_has_room(self) -> bool:
        """No new job while the workspace filesystem is below its free-space floor."""
        floor = self.cfg.workspace.min_free_mb
        free = probe.disk_free_mb(str(self.cfg.workspace.root))
        if free >= floor:
            if self.disk_low:
                log.info("workspace_disk_ok", free_mb=free, floor_mb=floor)
                self.disk_low = False
            return True
        if not self.disk_low:
            log.warning("workspace_disk_low_not_pulling", free_mb=free, floor_mb=floor)
            self.disk_low = True
        await trio.sleep(DISK_RECHECK_S)
        return False

    async def _pull_loop(self, ctx: JobContext, jobs: trio.Nursery) -> None:
        wait_s = self.cfg.coordinator.pull_wait_s
        idle = Backoff(self.cfg.heartbeat.backoff.min_s, self.cfg.heartbeat.backoff.max_s, self.rng)
        while True:
            await self._wait_until(self._may_pull)
            if not await self._disk_has_room():
                continue
            filters = self.pull_filters()
            try:
                with trio.CancelScope() as scope:
                    self._inflight_pull = (scope, filters)
                    reply = await self.client.pull(filters, wait_s)
            except NodeRejected as exc:
                log.error("pull_rejected", error=str(exc))
                self._set_status("rejected")
                continue
            except CoordinatorError as exc:
                delay = idle.next()
                log.error("pull_failed", error=str(exc), retry_in_s=round(delay, 2))
                await trio.sleep(delay)
                continue
            finally:
                self._inflight_pull = None
            if scope.cancelled_caught:
                continue  # capacity changed under a long poll: ask again with fresh filters
            idle.reset()
            if reply.job is None:
                if wait_s == 0:
                    await trio.sleep(jittered(1.0, 20, self.rng))
                continue
            handle = self._accept(ctx, jobs, reply)
            if handle is not None:
                # Ack before the next long poll goes out: the ack then never
                # queues behind our own pull at the coordinator.
                with trio.move_on_after(self.cfg.coordinator.timeout_s):
                    await handle.ack_done.wait()

    def _accept(self, ctx: JobContext, jobs: trio.Nursery, reply: PullReply) -> JobHandle | None:
        raw = reply.job
        assert raw is not None
        handle = job_handle_for(raw)
        if handle is None:
            log.error("job_unidentifiable", job=repr(raw)[:300])
            return None
        if reply.lease is None:
            log.error("job_without_lease", job_id=handle.job_id[:128])
            return None
        if handle.job_id in self.jobs:
            log.error("job_handed_out_twice", job_id=handle.job_id[:128])
            return None
        kind = "gpu" if handle.gpu and self.gpu_free > 0 else "cpu" if not handle.gpu else None
        if kind == "cpu":
            self.cpu_used += 1
        elif kind == "gpu":
            self.gpu_used += 1
        handle.slot = kind
        self.jobs[handle.job_id] = handle
        self._changed_now()
        jobs.start_soon(self._job_task, ctx, reply, handle, kind)
        return handle

    async def _job_task(
        self, ctx: JobContext, reply: PullReply, handle: JobHandle, kind: str | None
    ) -> None:
        assert reply.job is not None and reply.lease is not None
        try:
            pending = self.recovering.get(handle.job_id)
            if pending is not None:  # an older attempt of this job is still being reconciled
                await pending.wait()
            await JobRun(ctx, reply.job, reply.lease.lease_id, reply.signature, handle).run()
        except Exception:
            log.exception("job_driver_error", job_id=handle.job_id[:128])
        finally:
            if handle.gpus:  # before the slot is free again: the next job gets a clean GPU
                await self._after_gpu_job(handle)
            if kind == "cpu":
                self.cpu_used -= 1
            elif kind == "gpu":
                self.gpu_used -= 1
            self._release_gpus(handle.job_id)
            self.jobs.pop(handle.job_id, None)
            self._changed_now()
            self._refresh_stale_pull()

    def _refresh_stale_pull(self) -> None:
        """A long poll that advertised no free slot of a kind that is free now would
        keep such jobs waiting for up to pull_wait_s: cut it short and re-pull.
        (A job handed out at that very instant is not lost: its lease expires and
        the coordinator hands it out again.)"""
        if self._inflight_pull is None:
            return
        scope, filters = self._inflight_pull
        stale_cpu = filters.get("cpu_slots_free") == 0 and self.cpu_free > 0
        stale_gpu = filters.get("gpu_slots_free") == 0 and self.gpu_free > 0
        if stale_cpu or stale_gpu:
            scope.cancel()

    def _choose_gpus(self, m: Manifest) -> tuple[GpuInfo, ...]:
        """Claim GPUs for `m` (released by `_release_gpus`); () when none fit now."""
        need = m.requirements.vram_mb
        try:
            chosen = choose_gpus(
                self.gpus,
                count=m.requirements.gpu_count,
                vram_mb=need,
                in_use=self.gpu_in_use,
                jobs_per_gpu=self.cfg.gpu.jobs_per_gpu,
                reserved_mb=self.gpu_reserved_mb,
            )
        except NoGpuFree as exc:
            log.info("gpu_not_available", reason=str(exc))
            return ()
        uuids = tuple(g.uuid for g in chosen)
        self._release_gpus(m.job_id)
        self._gpu_claims[m.job_id] = (uuids, need)
        for uuid in uuids:
            self.gpu_in_use[uuid] = self.gpu_in_use.get(uuid, 0) + 1
            self.gpu_reserved_mb[uuid] = self.gpu_reserved_mb.get(uuid, 0) + need
        log.info("gpu_assigned", gpus=[g.index for g in chosen], uuids=list(uuids), vram_mb=need)
        return chosen

    def _release_gpus(self, job_id: str) -> None:
        uuids, need = self._gpu_claims.pop(job_id, ((), 0))
        for uuid in uuids:
            self.gpu_in_use[uuid] = max(0, self.gpu_in_use.get(uuid, 1) - 1)
            self.gpu_reserved_mb[uuid] = max(0, self.gpu_reserved_mb.get(uuid, need) - need)

    async def _after_gpu_job(self, handle: JobHandle) -> None:
        """Sweep the job's GPUs (shielded and bounded), then refresh the GPU snapshot."""
        grace = self.cfg.gpu.sweep_grace_s
        with trio.CancelScope(shield=True, deadline=trio.current_time() + grace + 10):
            try:
                pgid = cgroup = None
                try:
                    job_dir = self.cfg.workspace.root / handle.job_id
                    state = await trio.to_thread.run_sync(load_state, job_dir)
                    if state.attempt == handle.attempt:
                        pgid, cgroup = state.pgid, state.cgroup
                except (OSError, ValueError):
                    pass
                mark = JobMark(handle.job_id, handle.attempt, pgid, cgroup)
                await sweep_gpus(
                    self.inventory, handle.gpus, mark, grace_s=grace, metrics=self.metrics
                )
                self.gpus = await trio.to_thread.run_sync(self.inventory.snapshot)
                self._export_gpu_metrics()
            except Exception:
                log.exception("gpu_sweep_error", job_id=handle.job_id[:128])


def python_read_paths(cfg: MinerConfig) -> tuple[str, ...]:
    """What a python task must read besides the system dirs: the venv, the
    interpreter it points at, the task host and the task paths. Never raises:
    an unreadable venv only means python tasks will fail, not the daemon."""
    venv = Path(cfg.runners.python.venv)
    candidates = [venv, py_runner.TASK_HOST.parent, *cfg.runners.python.task_paths]
    try:
        for line in (venv / "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                candidates.append(Path(value.strip()).parent)
    except OSError:
        pass
    candidates.append(venv / "bin" / "python")
    paths = set()
    for path in candidates:
        try:
            real = Path(path).resolve()
        except OSError:
            continue
        paths.add(str(real.parent.parent if real.name.startswith("python") else real))
    return tuple(sorted(paths))
