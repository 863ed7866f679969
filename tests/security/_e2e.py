"""Helpers shared by the security end-to-end tests (real miner, real mock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.jobs import FINAL, cli_job, last_fail, wait_final  # noqa: F401 - re-exported


def marker_job(job_id: str, **extra: Any) -> dict[str, Any]:
    """A job that, if it ever ran, would leave a file named `ran-<job_id>` in work/."""
    return cli_job(job_id, "sh", ["-c", f"touch ran-{job_id}"], **extra)


def markers(root: Path) -> list[Path]:
    """Every `ran-*` marker anywhere below the miner's workspace root."""
    return sorted(root.rglob("ran-*")) if root.exists() else []
