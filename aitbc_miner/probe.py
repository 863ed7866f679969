"""Capability descriptor and live load figures (PROTOCOL.md register/heartbeat).

I/O: reads the host through psutil and the GPU inventory. Blocking calls are
cheap (no sleeps: cpu_percent is measured between successive calls).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from . import __version__
from .gpu import GpuInfo


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def disk_free_mb(path: str | os.PathLike[str]) -> int:
    """Free space for unprivileged writers on the filesystem holding `path`."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize // (1024 * 1024)


def descriptor(
    *,
    node_id: str,
    gpus: Sequence[GpuInfo],
    runners: Sequence[str],
    slots: dict[str, int],
    workspace_root: str,
    extra_tags: Sequence[str] = (),
) -> dict[str, Any]:
    """The capability descriptor sent with `POST /nodes/register`."""
    usable = [g for g in gpus if g.schedulable]  # MIG-mode or failing devices take no jobs
    tags = ["debian" if Path("/etc/debian_version").exists() else platform.system().lower(), "cpu"]
    if usable:
        tags.append("cuda")
    tags.extend(t for t in extra_tags if t not in tags)
    return {
        "node_id": node_id,
        "version": __version__,
        "cpu": {
            "cores": psutil.cpu_count(logical=True) or 1,
            "arch": platform.machine(),
            "model": _cpu_model(),
        },
        "memory_mb": psutil.virtual_memory().total // (1024 * 1024),
        "disk_free_mb": disk_free_mb(workspace_root),
        "gpu": [g.descriptor() for g in usable],
        "runners": list(runners),
        "slots": dict(slots),
        "tags": tags,
    }


def load_figures(workspace_root: str) -> dict[str, Any]:
    """The `load`, `free_mb` and `disk_free_mb` fields of a heartbeat."""
    load1 = os.getloadavg()[0]
    return {
        "load": {"cpu_pct": psutil.cpu_percent(interval=None), "load1": round(load1, 2)},
        "free_mb": psutil.virtual_memory().available // (1024 * 1024),
        "disk_free_mb": disk_free_mb(workspace_root),
    }
