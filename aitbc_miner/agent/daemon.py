"""The Agent: the daemon's one nursery owner, and the state its parts share.

For: :class:`Agent`, which builds the shared state (config branches, metrics, GPU
inventory, sandbox, fork server, coordinator client, slot counters, cancel scopes),
answers capacity and status questions (/healthz, /readyz, the watchdog rule), and
runs the daemon's lifetime in :meth:`Agent.run`: health server, fork server, warm
pool, registration, then the heartbeat, retention and job loops until drained.
The loops themselves live in the sibling modules and are mixed in here.
I/O: orchestration only (through the parts); decisions come from pure modules.
Must not: do job work (that is aitbc_miner.jobs) or speak the wire (coordinator.py).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

import httpx
import structlog
import trio

from .. import __version__, inputs, probe, systemd, watchdog
from .._trio import unwrap_group
from ..allowlist import Allowlist
from ..config import MinerConfig
from ..coordinator import CoordinatorClient
from ..gpu import GpuInfo, GpuInventory
from ..health import serve_health
from ..jobs import JobHandle
from ..metrics import Metrics
from ..sandbox.cgroups import detect, remove_stale
from ..sandbox.spawner import ForkServer
from ..sandbox.warm import WarmPool
from .drain import Draining
from .gpus import GpuClaims
from .heartbeat import Registration
from .pulling import Pulling
from .recovering import Recovering
from .wiring import Wiring

log = structlog.get_logger(__name__)


class Agent(Registration, Pulling, Recovering, GpuClaims, Draining, Wiring):
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
        self._heartbeats_stopping = False
        self._heartbeats_done = trio.Event()
        self._heartbeat_scope = trio.CancelScope()
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
                    if self.sandbox.active:  # groups a crashed daemon left behind, if empty
                        await trio.to_thread.run_sync(remove_stale, self.sandbox)
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
                        await self._stop_heartbeats()
                        await self._deregister()
                    root.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.forkserver.aclose()
                await downloads.aclose()
                await self.client.aclose()
        log.info("miner_stopped")
