"""The values a job run passes around, and the state JobRun's parts share.

For: :class:`JobHandle` (what the agent knows about a job in flight), :class:`JobContext`
(what every job of the daemon shares), :class:`Plan` (a checked job: what to execute
under which caps), :func:`job_handle_for` (a handle from a raw pulled job, if it has an
identity), :func:`utcnow`, and :class:`JobParts`, the base of JobRun's parts
(execute, report) that declares the attributes they share.
Pure: data and declarations only; no I/O.
Must not: hold behaviour beyond what a value needs (cancel once, the workspace root).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import trio

from ..allowlist import Allowlist
from ..cache import ModelCache
from ..config import MinerConfig
from ..coordinator import CoordinatorClient
from ..gpu import GpuInfo
from ..journal import JobState
from ..lifecycle import Phase
from ..manifest import Manifest, Signature, job_identity
from ..metrics import Metrics
from ..sandbox.cgroups import CgroupSupport, JobCgroup
from ..sandbox.limits import LimitPolicy
from ..sandbox.spawner import Spawner
from ..sandbox.warm import Warm, WarmPool
from ..security import SignatureVerifier
from ..workspace import Workspace


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
    landlock_abi: int = 0  # the kernel's Landlock ABI (>= 4: TCP, >= 6: signal scoping)
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


def job_handle_for(raw: dict[str, Any]) -> JobHandle | None:
    ident = job_identity(raw)
    if ident is None:
        return None
    requirements = raw.get("requirements")
    gpu = isinstance(requirements, dict) and requirements.get("gpu") is True
    return JobHandle(job_id=ident[0], attempt=ident[1], gpu=gpu)


class JobParts:
    """What JobRun.__init__ sets, declared once for the parts mixed into JobRun."""

    ctx: JobContext
    raw: dict[str, Any]
    lease_id: str
    signature: Signature | None
    handle: JobHandle
    ws: Workspace | None
    state: JobState | None
    t0: float
    marks: dict[str, float]  # time.monotonic() when acked, prepared, ran
    runner: str
    _progress: tuple[int, str] | None
    cgroup: JobCgroup | None
    warm: Warm | None  # the prepared start this job took, if any
    _progress_wakeup: trio.Event

    if TYPE_CHECKING:
        # report.Reporting
        async def _persist(self) -> None: ...
