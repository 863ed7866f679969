"""The daemon's one nursery owner: register, heartbeat, pull, run jobs, drain.

I/O: orchestration only. Each long-lived loop is a function in this module;
job work lives in jobs.py, wire details in coordinator.py, decisions in pure
modules. Signals: the first SIGTERM/SIGINT drains (stop pulling, heartbeat
`draining`, let jobs finish up to `shutdown.grace_s`, cancel the rest,
deregister, exit 0); a second one cancels running jobs at once.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import structlog
import trio

from . import __version__, probe, systemd
from ._trio import unwrap_group
from .allowlist import Allowlist
from .backoff import Backoff, jittered
from .config import MinerConfig
from .coordinator import CoordinatorClient
from .errors import CoordinatorError, CoordinatorUnavailable, NodeRejected
from .gpu import GpuInfo, GpuInventory, NoGpuFree, choose_gpus
from .health import serve_health
from .jobs import JobContext, JobHandle, JobRun, job_handle_for
from .manifest import Manifest, PullReply, RegisterReply
from .metrics import Metrics
from .security import SignatureVerifier

log = structlog.get_logger(__name__)

REPORT_BOUND_S = 30.0  # after the drain deadline, how long final reports may still take


class Agent:
    def __init__(
        self,
        cfg: MinerConfig,
        allowlist: Allowlist,
        *,
        nvml: Any = None,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.metrics = Metrics()
        self.rng = rng or random.Random()
        self._allowlist = allowlist
        self.inventory = GpuInventory(nvml, enabled=cfg.gpu.enable)
        self.gpus: list[GpuInfo] = self.inventory.snapshot()
        self.gpu_in_use: dict[str, int] = {}
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
        self.health_urls: list[str] = []
        self._changed = trio.Event()
        self._heartbeat_now = trio.Event()
        self._startup_scope = trio.CancelScope()
        self._pull_scope = trio.CancelScope()
        self._jobs_scope: trio.CancelScope | None = None
        self._root: trio.Nursery | None = None
        self._forced = False
        self.metrics.slots_total.labels(kind="cpu").set(cfg.resources.max_concurrent_cpu)
        self.metrics.slots_total.labels(kind="gpu").set(self.gpu_capacity)

    # -- capacity -----------------------------------------------------------------------

    @property
    def gpu_capacity(self) -> int:
        usable = sum(1 for g in self.gpus if g.available)
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
            "alive": True,
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
            "vram_free_mb": [g.vram_free_mb for g in self.gpus if g.available],
            "version": __version__,
        }

    # -- lifetime -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        structlog.contextvars.bind_contextvars(node_id=self.node_id)
        downloads = httpx.AsyncClient(
            timeout=self.cfg.coordinator.timeout_s, follow_redirects=True, max_redirects=5
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
                    task_status.started()
                    with self._startup_scope:
                        await self._register_until_done()
                    if self.client.registered and not self.draining:
                        systemd.notify("READY=1")
                        root.start_soon(self._heartbeat_loop)
                        await self._serve_jobs(self._job_context(downloads))
                        await self._deregister()
                    root.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await downloads.aclose()
                await self.client.aclose()
        log.info("miner_stopped")

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
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.begin_drain(signal.Signals(signum).name)

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
        body["gpu_free"] = [g.free_entry() for g in self.gpus if g.available]
        body["running_jobs"] = sorted(self.jobs)
        return body

    async def _heartbeat_loop(self) -> None:
        hb = self.cfg.heartbeat
        backoff = Backoff(hb.backoff.min_s, hb.backoff.max_s, self.rng)
        seq = 0
        while True:
            seq += 1
            if self.cfg.gpu.enable and self.gpus:
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
            self._heartbeat_now = trio.Event()
            with trio.move_on_after(delay):
                await self._heartbeat_now.wait()

    async def _renew_token_if_due(self) -> None:
        expires = self.client.token_expires_at
        if expires is not None and expires - time.time() < 2 * self.heartbeat_interval + 5:
            log.info("node_token_renewing", expires_in_s=round(expires - time.time(), 1))
            await self.client.register(retry=False)

    def _export_gpu_metrics(self) -> None:
        for g in self.gpus:
            labels = {"index": str(g.index), "uuid": g.uuid}
            self.metrics.gpu_memory_free.labels(**labels).set(g.vram_free_mb * 1024 * 1024)
            self.metrics.gpu_memory_used.labels(**labels).set(
                (g.vram_mb - g.vram_free_mb) * 1024 * 1024
            )
            self.metrics.gpu_util.labels(**labels).set(g.util_pct / 100)

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
                with self._pull_scope:
                    await self._pull_loop(ctx, jobs)
        self._jobs_scope = None

    def _may_pull(self) -> bool:
        return self.node_status == "active" and (self.cpu_free > 0 or self.gpu_free > 0)

    def pull_filters(self) -> dict[str, Any]:
        return {
            "runners": self.runners(),
            "cpu_slots_free": self.cpu_free,
            "gpu_slots_free": self.gpu_free,
            "vram_free_mb": [g.vram_free_mb for g in self.gpus if g.available],
            "tags": self.descriptor_tags(),
        }

    def descriptor_tags(self) -> list[str]:
        return ["cuda", "cpu"] if any(g.available for g in self.gpus) else ["cpu"]

    async def _pull_loop(self, ctx: JobContext, jobs: trio.Nursery) -> None:
        wait_s = self.cfg.coordinator.pull_wait_s
        idle = Backoff(self.cfg.heartbeat.backoff.min_s, self.cfg.heartbeat.backoff.max_s, self.rng)
        while True:
            await self._wait_until(self._may_pull)
            try:
                reply = await self.client.pull(self.pull_filters(), wait_s)
            except NodeRejected as exc:
                log.error("pull_rejected", error=str(exc))
                self._set_status("rejected")
                continue
            except CoordinatorError as exc:
                delay = idle.next()
                log.error("pull_failed", error=str(exc), retry_in_s=round(delay, 2))
                await trio.sleep(delay)
                continue
            idle.reset()
            if reply.job is None:
                if wait_s == 0:
                    await trio.sleep(jittered(1.0, 20, self.rng))
                continue
            self._accept(ctx, jobs, reply)

    def _accept(self, ctx: JobContext, jobs: trio.Nursery, reply: PullReply) -> None:
        raw = reply.job
        assert raw is not None
        handle = job_handle_for(raw)
        if handle is None:
            log.error("job_unidentifiable", job=repr(raw)[:300])
            return
        if reply.lease is None:
            log.error("job_without_lease", job_id=handle.job_id[:128])
            return
        if handle.job_id in self.jobs:
            log.error("job_handed_out_twice", job_id=handle.job_id[:128])
            return
        kind = "gpu" if handle.gpu and self.gpu_free > 0 else "cpu" if not handle.gpu else None
        if kind == "cpu":
            self.cpu_used += 1
        elif kind == "gpu":
            self.gpu_used += 1
        handle.slot = kind
        self.jobs[handle.job_id] = handle
        self._changed_now()
        jobs.start_soon(self._job_task, ctx, reply, handle, kind)

    async def _job_task(
        self, ctx: JobContext, reply: PullReply, handle: JobHandle, kind: str | None
    ) -> None:
        assert reply.job is not None and reply.lease is not None
        try:
            await JobRun(ctx, reply.job, reply.lease.lease_id, reply.signature, handle).run()
        except Exception:
            log.exception("job_driver_error", job_id=handle.job_id[:128])
        finally:
            if kind == "cpu":
                self.cpu_used -= 1
            elif kind == "gpu":
                self.gpu_used -= 1
            for uuid in handle.gpus:
                self.gpu_in_use[uuid] = self.gpu_in_use.get(uuid, 1) - 1
            self.jobs.pop(handle.job_id, None)
            self._changed_now()

    def _choose_gpus(self, m: Manifest) -> tuple[str, ...]:
        try:
            chosen = choose_gpus(
                self.gpus,
                count=m.requirements.gpu_count,
                vram_mb=m.requirements.vram_mb,
                in_use=self.gpu_in_use,
                jobs_per_gpu=self.cfg.gpu.jobs_per_gpu,
            )
        except NoGpuFree as exc:
            log.info("gpu_not_available", reason=str(exc))
            return ()
        for uuid in chosen:
            self.gpu_in_use[uuid] = self.gpu_in_use.get(uuid, 0) + 1
        return chosen
