"""Agent part: registration, the heartbeat loop, token renewal and deregistration.

For: registering until the coordinator answers (rejected nodes keep retrying at the
backoff ceiling), the node status it reports, the heartbeat body (load, GPU free
memory net of reservations, running jobs, ``draining``) and the loop that sends it,
refreshes the GPU snapshot, renews the node token and relays cancel requests.
I/O: coordinator calls and the NVML snapshot, through the Agent's client and inventory.
Must not: stop heartbeating while draining (the server would see a lost node), or
let an NVML or coordinator error end the loop.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
import trio

from .. import probe
from ..backoff import Backoff, jittered
from ..coordinator import token_renewal_due
from ..errors import CoordinatorError, CoordinatorUnavailable, NodeRejected
from ..gpu import effective_free_mb
from ..manifest import RegisterReply
from .base import AgentParts

log = structlog.get_logger(__name__)


class Registration(AgentParts):
    """Register, heartbeat, renew the token, deregister (a part of Agent)."""

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
        try:
            with self._heartbeat_scope:
                await self._heartbeats()
        finally:
            self._heartbeats_done.set()

    async def _stop_heartbeats(self) -> None:
        """Before deregistering: no heartbeat may reach the coordinator after it.

        One in flight is let finish (cancelling it could not unsend it); one that
        hangs past the coordinator timeout is cancelled.
        """
        self._heartbeats_stopping = True
        self._heartbeat_now.set()
        with trio.move_on_after(self.cfg.coordinator.timeout_s):
            await self._heartbeats_done.wait()
        self._heartbeat_scope.cancel()
        await self._heartbeats_done.wait()

    async def _heartbeats(self) -> None:
        hb = self.cfg.heartbeat
        backoff = Backoff(hb.backoff.min_s, hb.backoff.max_s, self.rng)
        seq = 0
        while not self._heartbeats_stopping:
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
            if self._heartbeats_stopping:  # asked while this one was in flight
                break
            self._heartbeat_now = trio.Event()
            with trio.move_on_after(delay):
                await self._heartbeat_now.wait()

    async def _renew_token_if_due(self) -> None:
        expires = self.client.token_expires_at
        if expires is not None and token_renewal_due(
            time.time(), self.client.token_issued_at, expires, self.heartbeat_interval
        ):
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
