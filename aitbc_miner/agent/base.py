"""What the parts of the Agent share: the state Agent.__init__ builds, declared once.

For: :class:`AgentParts`, the base of every part mixed into :class:`~.daemon.Agent`
(heartbeat, pulling, recovering, gpus, drain, wiring). It declares the attributes
they read and write and, for type checkers only, the methods one part calls on
another, so each part names what it relies on without importing the others.
Pure: declarations only; no behaviour, no I/O.
Must not: define behaviour (a stub here would hide a part's missing method).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from ..allowlist import Allowlist
from ..config import MinerConfig
from ..coordinator import CoordinatorClient
from ..gpu import GpuInfo, GpuInventory
from ..jobs import JobContext, JobHandle
from ..manifest import Manifest
from ..metrics import Metrics
from ..sandbox.cgroups import CgroupSupport
from ..sandbox.spawner import ForkServer
from ..sandbox.warm import WarmPool


class AgentParts:
    cfg: MinerConfig
    node_id: str
    metrics: Metrics
    rng: random.Random
    client: CoordinatorClient
    _allowlist: Allowlist
    # resources
    inventory: GpuInventory
    gpus: list[GpuInfo]
    gpu_in_use: dict[str, int]
    gpu_reserved_mb: dict[str, int]
    _gpu_claims: dict[str, tuple[tuple[str, ...], int]]
    sandbox: CgroupSupport
    forkserver: ForkServer
    warm: WarmPool | None
    disk_low: bool
    # node and jobs
    node_status: str
    draining: bool
    jobs: dict[str, JobHandle]
    cpu_used: int
    gpu_used: int
    recovering: dict[str, trio.Event]
    heartbeat_interval: float
    last_heartbeat_ok: float | None
    # lifetime: signals, scopes, wake-ups
    _early_signals: list[int]
    _inflight_pull: tuple[trio.CancelScope, dict[str, Any]] | None
    _heartbeat_now: trio.Event
    _heartbeats_stopping: bool
    _heartbeats_done: trio.Event
    _heartbeat_scope: trio.CancelScope
    _startup_scope: trio.CancelScope
    _pull_scope: trio.CancelScope
    _jobs_scope: trio.CancelScope | None
    _recovery_scope: trio.CancelScope
    _root: trio.Nursery | None
    _forced: bool

    if TYPE_CHECKING:
        # daemon.Agent
        @property
        def cpu_free(self) -> int: ...
        @property
        def gpu_free(self) -> int: ...
        def runners(self) -> list[str]: ...
        def _changed_now(self) -> None: ...
        async def _wait_until(self, condition: Callable[[], bool]) -> None: ...
        def mark_loop_progress(self, next_in_s: float) -> None: ...

        # heartbeat.Registration
        def _set_status(self, status: str) -> None: ...
        def _export_gpu_metrics(self) -> None: ...

        # recovering.Recovering
        async def _start_recovery(self, ctx: JobContext, jobs: trio.Nursery) -> None: ...
        async def _bound_recovery(self) -> None: ...

        # gpus.GpuClaims
        def _choose_gpus(self, m: Manifest) -> tuple[GpuInfo, ...]: ...
        def _release_gpus(self, job_id: str) -> None: ...
        async def _after_gpu_job(self, handle: JobHandle) -> None: ...
