"""Post-job GPU sweep: kill what a finished job left holding memory on its GPUs.

I/O: /proc, signals, and NVML through `GpuInventory`. Only a process that NVML
lists on one of the job's GPUs *and* that belongs to the job is touched: it
runs as the daemon's uid and sits in the job's cgroup, process group or
session, or carries the job's `AITBC_JOB_ID`/`AITBC_ATTEMPT` in its initial
environment (which catches `setsid`/daemonised stragglers that left the group).
A pid is signalled through a pidfd opened *before* the check and still alive
after it, so a recycled pid is never hit. Memory that is not released within
`grace_s` quarantines the GPU until NVML stops listing those processes. It
must not touch foreign processes: those only cost VRAM in the policy.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from .gpu import GpuInventory

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class JobMark:
    """What identifies a job's processes (from JobHandle / state.json)."""

    job_id: str
    attempt: int
    pgid: int | None = None
    cgroup: str | None = None


@dataclass(frozen=True)
class ProcFacts:
    pid: int
    uid: int
    pgid: int | None
    sid: int | None
    cgroups: tuple[str, ...]  # every path in /proc/<pid>/cgroup (v2 and v1 hierarchies)
    env_job_id: str | None
    env_attempt: str | None


@dataclass
class SweepReport:
    killed: list[tuple[str, int, str]] = field(default_factory=list)  # (uuid, pid, why)
    quarantined: list[str] = field(default_factory=list)


def belongs(facts: ProcFacts, mark: JobMark, *, uid: int, own_pid: int) -> str | None:
    """Why `facts` is a process of the job (cgroup|pgid|sid|env), or None. Pure."""
    if facts.pid == own_pid or facts.uid != uid:
        return None
    leaf = os.path.basename(mark.cgroup.rstrip("/")) if mark.cgroup else ""
    if leaf and any(leaf in path.split("/") for path in facts.cgroups):
        # The job's cgroup name is unique per attempt; matching it as a path component
        # works for v1 and v2, below a cgroup namespace, and in sub-groups of the job.
        return "cgroup"
    if mark.pgid is not None and mark.pgid > 1:
        if facts.pgid == mark.pgid:
            return "pgid"
        if facts.sid == mark.pgid:  # the job leader started a new session: sid == pgid
            return "sid"
    if facts.env_job_id == mark.job_id and facts.env_attempt == str(mark.attempt):
        return "env"
    return None


def read_facts(pid: int) -> ProcFacts | None:
    """What /proc says about `pid`; None when it is gone or not ours to read."""
    base = f"/proc/{pid}"
    try:
        uid = os.stat(base).st_uid
        pgid, sid = os.getpgid(pid), os.getsid(pid)
    except OSError:
        return None
    cgroups: list[str] = []
    try:
        with open(f"{base}/cgroup", encoding="utf-8", errors="replace") as fh:
            for line in fh:  # "0::/path" (v2) or "4:memory:/path" (v1)
                cgroups.append(line.rstrip("\n").split(":", 2)[-1])
    except OSError:
        pass
    env: dict[bytes, bytes] = {}
    try:
        with open(f"{base}/environ", "rb") as fh:
            for item in fh.read(1 << 20).split(b"\0"):
                key, sep, value = item.partition(b"=")
                if sep and key in (b"AITBC_JOB_ID", b"AITBC_ATTEMPT"):
                    env[key] = value
    except OSError:
        pass

    def text(key: bytes) -> str | None:
        value = env.get(key)
        return value.decode("utf-8", "replace") if value is not None else None

    return ProcFacts(
        pid, uid, pgid, sid, tuple(cgroups), text(b"AITBC_JOB_ID"), text(b"AITBC_ATTEMPT")
    )


def _alive(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def kill_if_ours(pid: int, mark: JobMark) -> str | None:
    """SIGKILL `pid` if it belongs to the job; returns why it was judged ours."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        facts = read_facts(pid)
        why = (
            belongs(facts, mark, uid=os.getuid(), own_pid=os.getpid())
            if facts is not None
            else None
        )
        if why is None or not _alive(pidfd):  # alive: the pid was not recycled meanwhile
            return None
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError as exc:
            log.warning("gpu_sweep_kill_failed", pid=pid, error=exc.strerror)
            return None
        return why
    finally:
        os.close(pidfd)


async def sweep(
    inventory: GpuInventory,
    uuids: Iterable[str],
    mark: JobMark,
    *,
    grace_s: float,
    poll_s: float = 0.2,
    metrics: Any = None,
) -> SweepReport:
    """Kill the job's leftover GPU processes; quarantine a GPU whose memory stays held."""
    report = SweepReport()
    leftovers: dict[str, set[int]] = {}
    for uuid in dict.fromkeys(uuids):
        procs = await trio.to_thread.run_sync(inventory.compute_processes, uuid)
        for proc in procs or ():
            why = kill_if_ours(proc.pid, mark)
            if why is None:
                continue
            leftovers.setdefault(uuid, set()).add(proc.pid)
            report.killed.append((uuid, proc.pid, why))
            log.warning(
                "gpu_sweep_killed",
                job_id=mark.job_id,
                uuid=uuid,
                pid=proc.pid,
                used_mb=proc.used_mb,
                matched_by=why,
            )
            if metrics is not None:
                metrics.gpu_sweep_kills.inc()
    deadline = trio.current_time() + grace_s
    while leftovers:
        for uuid in list(leftovers):
            procs = await trio.to_thread.run_sync(inventory.compute_processes, uuid)
            if procs is not None:
                leftovers[uuid] &= {p.pid for p in procs}
            if not leftovers[uuid]:
                del leftovers[uuid]
        if not leftovers or trio.current_time() >= deadline:
            break
        await trio.sleep(poll_s)
    for uuid, pids in leftovers.items():
        inventory.quarantine(uuid, pids)
        report.quarantined.append(uuid)
        log.error(
            "gpu_quarantined",
            job_id=mark.job_id,
            uuid=uuid,
            pids=sorted(pids),
            reason=f"memory still held {grace_s:g} s after the kill",
        )
    return report
