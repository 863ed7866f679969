"""Start-up crash recovery and the retention sweeper for job workspaces.

I/O: filesystem, processes, coordinator (through JobRun). Decisions are pure
(`lifecycle.recovery_action`, `sweep_due`); this module finds the state files,
makes sure no process of an interrupted job survives, and hands each job to
JobRun to report or resume. Recovery reads only state.json (STYLE rule 6).

A process group recorded in state.json is only killed when it is provably the
job's: same boot, and at least one member whose environment names the job or
whose working directory is inside its workspace. A bare pid is never killed.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import structlog

from .journal import STATE_FILE, JobState, current_boot_id, load_state
from .lifecycle import REPORTING, TERMINAL, Phase, Recovery, recovery_action

log = structlog.get_logger(__name__)

QUARANTINE = ".quarantine"


@dataclass(frozen=True)
class Found:
    job_dir: Path
    state: JobState
    action: Recovery


def job_dirs(root: Path) -> Iterator[Path]:
    """Workspace directories under `root` (never symlinks, never dot-dirs)."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        yield Path(entry.path)


def quarantine(root: Path, job_dir: Path, reason: str) -> Path:
    target_dir = root / QUARANTINE
    target_dir.mkdir(mode=0o700, exist_ok=True)
    target = target_dir / f"{job_dir.name}-{int(time.time() * 1000)}"
    os.rename(job_dir, target)
    log.error("workspace_quarantined", workspace=str(job_dir), moved_to=str(target), reason=reason)
    return target


def scan(root: Path) -> list[Found]:
    """Every workspace with a readable state; unreadable ones are quarantined."""
    found = []
    for job_dir in job_dirs(root):
        if not (job_dir / STATE_FILE).exists():
            # Created but never journaled: no process was started for it.
            quarantine(root, job_dir, "no state.json")
            continue
        try:
            state = load_state(job_dir)
        except (ValueError, OSError) as exc:
            quarantine(root, job_dir, f"unreadable state.json: {exc}")
            continue
        found.append(Found(job_dir, state, recovery_action(state.phase, state.confirmed)))
    return found


def _belongs(proc: psutil.Process, job_id: str, job_dir: Path) -> bool:
    try:
        if proc.environ().get("AITBC_JOB_ID") == job_id:
            return True
        cwd = proc.cwd()
    except (psutil.Error, OSError):
        return False
    return cwd == str(job_dir) or cwd.startswith(str(job_dir) + os.sep)


def job_group_members(state: JobState, job_dir: Path) -> list[psutil.Process]:
    """Live processes of the job's recorded process group, if provably the job's."""
    if state.pgid is None or state.boot_id is None or state.boot_id != current_boot_id():
        return []
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == state.pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    if not any(_belongs(p, state.job_id, job_dir) for p in members):
        return []
    return members


def kill_leftovers(state: JobState, job_dir: Path, timeout: float = 5.0) -> int:
    """SIGKILL what is left of an interrupted job; returns how many processes died."""
    members = job_group_members(state, job_dir)
    if not members:
        return 0
    assert state.pgid is not None
    try:
        os.killpg(state.pgid, signal.SIGKILL)
    except ProcessLookupError:
        return 0
    _, alive = psutil.wait_procs(members, timeout=timeout)
    log.warning(
        "job_leftovers_killed",
        job_id=state.job_id,
        pgid=state.pgid,
        killed=len(members) - len(alive),
        still_alive=len(alive),
    )
    return len(members) - len(alive)


# -- retention --------------------------------------------------------------------------


def sweep_due(state: JobState, now: float, keep_success_s: float, keep_failed_s: float) -> bool:
    """Pure: may this workspace be removed now?"""
    if state.phase not in TERMINAL:
        return False
    if state.phase in REPORTING and not state.confirmed:
        return False
    keep = keep_success_s if state.phase is Phase.DONE else keep_failed_s
    return now - state.updated_at >= keep


def sweep(
    root: Path, *, keep_success_s: float, keep_failed_s: float, now: float | None = None
) -> int:
    """Remove expired workspaces of finished jobs; returns how many were removed."""
    now = time.time() if now is None else now
    removed = 0
    for job_dir in job_dirs(root):
        try:
            state = load_state(job_dir)
        except (ValueError, OSError):
            continue  # recovery's business, not the sweeper's
        if not sweep_due(state, now, keep_success_s, keep_failed_s):
            continue
        # rmtree removes links, never what they point to (fd-based on Linux).
        assert shutil.rmtree.avoids_symlink_attacks
        shutil.rmtree(job_dir, ignore_errors=True)
        removed += 1
        log.info(
            "workspace_swept",
            job_id=state.job_id,
            phase=state.phase.value,
            age_s=round(now - state.updated_at),
        )
    return removed
