"""Agent part: the pull loop, slot accounting and the task that drives each job.

For: serving jobs in the jobs nursery (recovery first, then the long-poll pull
loop), the pull filters (free CPU/GPU slots, VRAM offers, tags), the disk-space
floor, accepting a pulled job into a slot, and the job task that waits for an
older attempt's recovery, runs :class:`~aitbc_miner.jobs.JobRun`, then gives the
slot back (GPU sweep first) and cuts short a long poll that went stale.
I/O: coordinator pulls, through the Agent's client; job work is aitbc_miner.jobs.
Must not: let a job's error escape its task, or start a long poll before the
previous job's ack is over (the ack would queue behind our own pull).
"""

from __future__ import annotations

from typing import Any

import structlog
import trio

from .. import probe
from .._trio import unwrap_group
from ..backoff import Backoff, jittered
from ..errors import CoordinatorError, NodeRejected
from ..gpu import device_slots_free, vram_offers
from ..jobs import JobContext, JobHandle, JobRun, job_handle_for
from ..manifest import PullReply
from .base import AgentParts

log = structlog.get_logger(__name__)

DISK_RECHECK_S = 5.0  # while the workspace filesystem is too full to take jobs


class Pulling(AgentParts):
    """Pull jobs while slots are free, and drive each one in its slot (a part of Agent)."""

    async def _serve_jobs(self, ctx: JobContext) -> None:
        with unwrap_group():
            async with trio.open_nursery() as jobs:
                self._jobs_scope = jobs.cancel_scope
                await self._start_recovery(ctx, jobs)
                with self._pull_scope:
                    await self._pull_loop(ctx, jobs)
        self._jobs_scope = None

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
