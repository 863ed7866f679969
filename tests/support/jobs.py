"""Job manifests and waits shared by the end-to-end tests."""

from __future__ import annotations

import json
from typing import Any

import psutil

from .wait import wait_for

FINAL = ("succeeded", "failed", "cancelled", "expired")


def cli_job(job_id: str, command: str, args: list[str], **extra: Any) -> dict[str, Any]:
    job = {"job_id": job_id, "runner": "cli", "timeout_s": 30, "command": command, "args": args}
    job.update(extra)
    return job


def sh_job(job_id: str, script: str, **extra: Any) -> dict[str, Any]:
    """A job for the test-only `sh` allowlist entry (tests/conftest.py)."""
    extra.setdefault("timeout_s", 60)
    return cli_job(job_id, "sh", ["-c", script], **extra)


def wait_final(mock: Any, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The coordinator's record of `job_id` once it is in a final state."""
    return wait_for(
        lambda: (j := mock.admin.job(job_id))["state"] in FINAL and j,
        timeout=timeout,
        what=f"job {job_id} final",
    )


def last_fail(job: dict[str, Any]) -> dict[str, Any]:
    assert job["fails"], f"no fail record: {json.dumps(job)[:2000]}"
    return job["fails"][-1]


def pid_gone(pid: int) -> bool:
    """Dead, or a zombie nobody has reaped yet (it runs no code any more)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
