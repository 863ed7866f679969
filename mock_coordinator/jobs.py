"""The mock's job queue and lifecycle: FIFO hand-out with filter matching, leases, attempts
and the ack/progress/fail/result/cancel/expiry transitions. Pure: no I/O, no clock; every
method that needs the time takes `now` (time.time() seconds)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import uuid
from typing import Any

from .common import SAFE_ID_RE, ApiError, rfc3339

ACTIVE = ("leased", "acked")
FINAL = ("succeeded", "failed", "cancelled", "expired")


@dataclasses.dataclass
class Job:
    id: str  # internal id: the manifest's job_id when a unique string, else adm-N
    manifest: dict[str, Any]
    seq: int  # FIFO position; a requeued job goes to the back
    enqueued_at: float
    sign: str = "ed25519"
    lease_s: float = 30.0
    retry: bool = True
    raw: bool = False
    chunk_size: int | None = None
    max_attempts: int = 5
    state: str = "queued"
    attempt: int = 1
    holder: str | None = None
    lease_id: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    finished_at: float | None = None
    handed_out_at: dict[str, float] = dataclasses.field(default_factory=dict)
    attempts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    progress: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    fails: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    results_accepted: int = 0
    result: dict[str, Any] | None = None
    result_attempt: int | None = None
    artifacts: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def job_id(self) -> Any:
        """The id the miner knows: the manifest's job_id (any JSON value), else the internal id."""
        return self.manifest.get("job_id", self.id)

    @property
    def storage_key(self) -> str:
        """A directory name for this job's artifacts, safe even for ids like '../x'."""
        if SAFE_ID_RE.match(self.id):
            return self.id
        return "id-" + hashlib.sha256(self.id.encode()).hexdigest()[:16]

    @property
    def lease(self) -> dict[str, Any] | None:
        if self.lease_id is None or self.lease_expires_at is None:
            return None
        return {"lease_id": self.lease_id, "expires_at": rfc3339(self.lease_expires_at)}

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "state": self.state,
            "attempt": self.attempt,
            "holder": self.holder,
            "results_accepted": self.results_accepted,
            "enqueued_at": self.enqueued_at,
            "cancel_requested": self.cancel_requested,
        }

    def describe(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "manifest": self.manifest,
            "options": {
                "sign": self.sign,
                "lease_s": self.lease_s,
                "retry": self.retry,
                "raw": self.raw,
                "chunk_size": self.chunk_size,
                "max_attempts": self.max_attempts,
            },
            "lease": self.lease,
            "lease_expires_at": self.lease_expires_at,
            "finished_at": self.finished_at,
            "handed_out_at": self.handed_out_at,
            "attempts": self.attempts,
            "history": self.history,
            "progress": self.progress,
            "fails": self.fails,
            "result": self.result,
            "result_attempt": self.result_attempt,
            "artifacts": self.artifacts,
        }


def matches(manifest: dict[str, Any], filters: dict[str, Any]) -> bool:
    """Does a pull with `filters` take this job? Malformed manifests match anything so a
    miner gets to reject them itself (E_INVALID)."""
    runners = filters.get("runners")
    runner = manifest.get("runner")
    if isinstance(runners, list) and isinstance(runner, str) and runner not in runners:
        return False
    requirements = manifest.get("requirements")
    gpu = isinstance(requirements, dict) and requirements.get("gpu") is True
    free = filters.get("gpu_slots_free" if gpu else "cpu_slots_free")
    return not (isinstance(free, int) and free < 1)


class JobBoard:
    def __init__(self, lease_s: float, max_attempts: int) -> None:
        self.default_lease_s = lease_s
        self.default_max_attempts = max_attempts
        self.jobs: dict[str, Job] = {}
        self._seq = 0
        self._admin_ids = 0

    # -- enqueue and hand-out -------------------------------------------------------------
    def enqueue(self, manifest: dict[str, Any], now: float, **opts: Any) -> Job:
        ref = manifest.get("job_id")
        if isinstance(ref, str) and ref and ref not in self.jobs:
            job_id = ref
        else:
            while True:
                self._admin_ids += 1
                job_id = f"adm-{self._admin_ids}"
                if job_id not in self.jobs:
                    break
        opts = {k: v for k, v in opts.items() if v is not None}
        opts.setdefault("lease_s", self.default_lease_s)
        opts.setdefault("max_attempts", self.default_max_attempts)
        job = Job(id=job_id, manifest=manifest, seq=self._next_seq(), enqueued_at=now, **opts)
        self.jobs[job_id] = job
        return job

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def queued(self) -> list[Job]:
        return sorted((j for j in self.jobs.values() if j.state == "queued"), key=lambda j: j.seq)

    def take(self, node_id: str, filters: dict[str, Any], now: float) -> Job | None:
        """Lease the first queued job that matches `filters` to `node_id`."""
        for job in self.queued():
            if matches(job.manifest, filters):
                job.state = "leased"
                job.holder = node_id
                job.lease_id = str(uuid.uuid4())
                job.lease_expires_at = now + job.lease_s
                job.handed_out_at[str(job.attempt)] = now
                job.attempts.append(
                    {
                        "attempt": job.attempt,
                        "node_id": node_id,
                        "lease_id": job.lease_id,
                        "handed_out_at": now,
                        "acked_at": None,
                        "ended_at": None,
                        "outcome": None,
                    }
                )
                return job
        return None

    @staticmethod
    def wire_job(job: Job) -> dict[str, Any]:
        """The manifest as handed out: with the current attempt unless enqueued raw."""
        manifest = copy.deepcopy(job.manifest)
        if not job.raw:
            manifest["attempt"] = job.attempt
        return manifest

    # -- lookups ----------------------------------------------------------------------------
    def find(self, ref: str, node_id: str) -> Job | None:
        """The job a miner means by `ref`: one it holds first, then by internal id, then
        the most recent with that manifest job_id."""
        held = [
            j
            for j in self.jobs.values()
            if j.holder == node_id and j.state in ACTIVE and ref in (j.id, str(j.job_id))
        ]
        if held:
            return held[0]
        if ref in self.jobs:
            return self.jobs[ref]
        named = [j for j in self.jobs.values() if str(j.job_id) == ref]
        return max(named, key=lambda j: j.seq) if named else None

    def lookup(self, ref: str) -> Job | None:
        """Admin lookup: by internal id, else the latest job whose job_id reads `ref`."""
        if ref in self.jobs:
            return self.jobs[ref]
        named = [j for j in self.jobs.values() if str(j.job_id) == ref]
        return max(named, key=lambda j: j.seq) if named else None

    def held(self, ref: str, node_id: str, attempt: int) -> Job:
        """The job if `node_id` holds its current `attempt` under a live lease; else 404/409."""
        job = self.find(ref, node_id)
        if job is None:
            raise ApiError(404, "unknown job", job_id=ref)
        if job.state in FINAL:
            raise ApiError(409, f"job is {job.state}", state=job.state)
        if job.state == "queued" or job.holder != node_id:
            raise ApiError(409, "job is not held by this node", state=job.state)
        if attempt != job.attempt:
            raise ApiError(409, "stale attempt", attempt=job.attempt)
        return job

    # -- transitions -------------------------------------------------------------------------
    def ack(self, job: Job, lease_id: str, now: float) -> None:
        if lease_id != job.lease_id:
            raise ApiError(409, "lease_id does not match the current lease")
        if job.cancel_requested:
            raise ApiError(409, "job cancelled")
        job.state = "acked"
        if job.attempts and job.attempts[-1]["acked_at"] is None:
            job.attempts[-1]["acked_at"] = now

    def extend(self, job: Job, now: float) -> None:
        job.lease_expires_at = now + job.lease_s

    def fail(self, job: Job, report: dict[str, Any], now: float) -> str:
        """Record a failure; requeue if retryable and attempts remain. Returns the new state."""
        job.fails.append({"attempt": job.attempt, "ts": now, **report})
        code = report["error_code"]
        self._end_attempt(job, f"failed:{code}", now)
        if job.cancel_requested:
            return self._finish(job, "cancelled" if code == "E_CANCELLED" else "failed", now)
        if (
            report["retryable"]
            and job.retry
            and code != "E_INVALID"
            and job.attempt < job.max_attempts
        ):
            return self._requeue(job)
        return self._finish(job, "failed", now)

    def accept_result(
        self, job: Job, metadata: dict[str, Any], artifacts: list[dict[str, Any]], now: float
    ) -> None:
        job.results_accepted += 1
        job.result = metadata
        job.result_attempt = job.attempt
        job.artifacts = artifacts
        self._end_attempt(job, "succeeded", now)
        self._finish(job, "succeeded", now)

    def cancel(self, job: Job, now: float) -> None:
        if job.state in FINAL:
            raise ApiError(409, f"job is already {job.state}")
        job.cancel_requested = True
        if job.state == "queued":
            self._finish(job, "cancelled", now)

    def expire(self, now: float) -> list[Job]:
        """Handle every lease that ran out; return the jobs that changed."""
        changed = []
        for job in list(self.jobs.values()):
            if (
                job.state in ACTIVE
                and job.lease_expires_at is not None
                and job.lease_expires_at <= now
            ):
                self._end_attempt(job, "lease_expired", now)
                if job.cancel_requested:
                    self._finish(job, "cancelled", now)
                elif job.attempt >= job.max_attempts:
                    self._finish(job, "expired", now)
                else:
                    self._requeue(job)
                changed.append(job)
        return changed

    def next_deadline(self) -> float | None:
        deadlines = [
            j.lease_expires_at
            for j in self.jobs.values()
            if j.state in ACTIVE and j.lease_expires_at is not None
        ]
        return min(deadlines, default=None)

    def _end_attempt(self, job: Job, outcome: str, now: float) -> None:
        if job.attempts and job.attempts[-1]["outcome"] is None:
            job.attempts[-1].update(ended_at=now, outcome=outcome)

    def _clear_lease(self, job: Job) -> None:
        job.lease_id = None
        job.lease_expires_at = None

    def _requeue(self, job: Job) -> str:
        self._clear_lease(job)
        job.holder = None
        job.state = "queued"
        job.attempt += 1
        job.seq = self._next_seq()
        return job.state

    def _finish(self, job: Job, state: str, now: float) -> str:
        self._clear_lease(job)
        job.state = state
        job.finished_at = now
        return state

    # -- persistence ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self._seq,
            "admin_ids": self._admin_ids,
            "jobs": [dataclasses.asdict(j) for j in self.jobs.values()],
        }

    def load_json(self, data: dict[str, Any]) -> None:
        self._seq = data.get("seq", 0)
        self._admin_ids = data.get("admin_ids", 0)
        self.jobs = {j["id"]: Job(**j) for j in data.get("jobs", [])}
