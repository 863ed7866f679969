"""Agent part: GPU claims for jobs, their release, and the sweep after a GPU job.

For: claiming devices for a manifest under the "least used VRAM that fits" policy
(counts and reserved MiB per UUID, one claim per job), releasing a job's claim
(idempotent), and, after a GPU job, sweeping its leftover GPU processes (shielded
and bounded) and refreshing the snapshot before the slot is given back.
The choice itself is gpu.choose_gpus and the sweep's rule gpu_sweep's.
I/O: NVML through the Agent's inventory; state.json (read) for the job's marks.
Must not: place a job on a device it did not claim, or let a sweep error escape.
"""

from __future__ import annotations

import structlog
import trio

from ..gpu import GpuInfo, NoGpuFree, choose_gpus
from ..gpu_sweep import JobMark
from ..gpu_sweep import sweep as sweep_gpus
from ..jobs import JobHandle
from ..journal import load_state
from ..manifest import Manifest
from .base import AgentParts

log = structlog.get_logger(__name__)


class GpuClaims(AgentParts):
    """Which job holds which GPUs, and the clean-up after a GPU job (a part of Agent)."""

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
