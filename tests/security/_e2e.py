"""Helpers shared by the security end-to-end tests (real miner, real mock)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.wait import wait_for

FINAL = ("succeeded", "failed", "cancelled", "expired")


def cli_job(job_id: str, command: str, args: list[str], **extra: Any) -> dict[str, Any]:
    job = {"job_id": job_id, "runner": "cli", "timeout_s": 30, "command": command, "args": args}
    job.update(extra)
    return job


def marker_job(job_id: str, **extra: Any) -> dict[str, Any]:
    """A job that, if it ever ran, would leave a file named `ran-<job_id>` in work/."""
    return cli_job(job_id, "sh", ["-c", f"touch ran-{job_id}"], **extra)


def wait_final(mock: Any, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
    return wait_for(
        lambda: (j := mock.admin.job(job_id))["state"] in FINAL and j,
        timeout=timeout,
        what=f"job {job_id} final",
    )


def last_fail(job: dict[str, Any]) -> dict[str, Any]:
    assert job["fails"], f"no fail record: {json.dumps(job)[:2000]}"
    return job["fails"][-1]


def markers(root: Path) -> list[Path]:
    """Every `ran-*` marker anywhere below the miner's workspace root."""
    return sorted(root.rglob("ran-*")) if root.exists() else []
