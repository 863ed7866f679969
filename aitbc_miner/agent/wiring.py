"""Agent part: what the daemon hands every job, and the sandbox it can promise them.

For: building the :class:`~aitbc_miner.jobs.JobContext` shared by all jobs
(signature verifier, current allowlist, GPU claims, fork server, warm pool,
cgroups, limit policy, network/Landlock availability, model cache), the sandbox
report for /healthz and the start-up log (with the warnings an operator must
see), and :func:`python_read_paths`, the paths a python task must read.
I/O: the python venv's pyvenv.cfg and path resolution (read only); opens the cache.
Must not: report a protection as enforced that this host cannot give.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import structlog

from ..cache import open_cache
from ..config import MinerConfig
from ..jobs import JobContext
from ..runners import python as py_runner
from ..sandbox.limits import LimitPolicy
from ..security import SignatureVerifier
from .base import AgentParts

log = structlog.get_logger(__name__)


class Wiring(AgentParts):
    """The job context and the sandbox report (a part of Agent)."""

    @property
    def landlock_abi(self) -> int:
        """The Landlock ABI jobs get: the kernel's, or 0 with resources.landlock off."""
        return self.forkserver.landlock_abi if self.cfg.resources.landlock else 0

    def sandbox_status(self) -> dict[str, Any]:
        enforced = dict(self.sandbox.enforced())
        abi = self.landlock_abi
        if self.forkserver.netns == "ok":
            enforced["network"] = "private namespace (loopback only)"
        elif abi >= 4:
            enforced["network"] = "TCP only (landlock: no TCP connect/bind; UDP still open)"
        else:
            enforced["network"] = "NOT ISOLATED"
        enforced["filesystem"] = (
            f"landlock ABI {abi} (own workspace + system dirs)"
            if abi > 0
            else "NOT CONFINED (uid and file modes only)"
        )
        enforced["signals"] = (
            "own processes only (landlock scope)"
            if abi >= 6
            else "NOT SCOPED (any process of the daemon's uid)"
        )
        enforced["rlimits"] = "nofile, nproc, fsize, core=0; no_new_privs; nice/ionice"
        return enforced

    def _log_sandbox(self) -> None:
        status = self.sandbox_status()
        log.info(
            "sandbox",
            **status,
            cgroup_mode=self.cfg.resources.cgroup,
            reason=self.sandbox.reason or None,
        )
        if self.sandbox.active and not self.sandbox.favordynmods:
            who = (
                "job starts are prepared ahead so jobs do not wait, except cold starts "
                "(the first network: true job, more jobs at once than spares)"
                if self.cfg.resources.warm_starts
                else "every job start waits for it (resources.warm_starts is off)"
            )
            log.info(
                "cgroup_moves_slow",
                detail="moving a process into a cgroup waits ~10-20 ms for the kernel here; "
                f"{who}. Mount cgroup2 with favordynmods (or boot with "
                "cgroup_favordynmods=true) to make it ~0.3 ms",
            )
        if self.forkserver.netns != "ok":
            log.warning(
                "network_isolation_unavailable",
                detail="this host allows neither user nor network namespaces: jobs whose "
                "allowlist entry says network: false "
                + (
                    "cannot use TCP (Landlock) but can still send UDP"
                    if status["network"].startswith("TCP only")
                    else "will still reach the network"
                ),
            )

    def _job_context(self, downloads: httpx.AsyncClient) -> JobContext:
        sec = self.cfg.security
        verifier = SignatureVerifier.from_config(
            sec.manifest_keys,
            {k: v.get_secret_value() for k, v in sec.hmac_keys.items()},
            sec.require_signed_manifests,
        )
        return JobContext(
            cfg=self.cfg,
            node_id=self.node_id,
            client=self.client,
            verifier=verifier,
            allowlist=lambda: self._allowlist,
            metrics=self.metrics,
            downloads=downloads,
            choose_gpus=self._choose_gpus,
            spawner=self.forkserver,
            warm=self.warm,
            sandbox=self.sandbox,
            limit_policy=LimitPolicy(
                cpu_nice=self.cfg.resources.cpu_nice,
                io_class=self.cfg.resources.io_class,
                io_level=self.cfg.resources.io_level,
                max_open_files=self.cfg.resources.max_open_files,
                max_processes=self.cfg.resources.max_processes,
            ),
            netns=self.forkserver.netns == "ok",
            landlock=self.landlock_abi > 0,
            landlock_abi=self.landlock_abi,
            python_read=python_read_paths(self.cfg),
            cache=open_cache(
                self.cfg.cache.root, self.cfg.cache.max_gb, self.cfg.cache.pinned, self.metrics
            ),
        )


def python_read_paths(cfg: MinerConfig) -> tuple[str, ...]:
    """What a python task must read besides the system dirs: the venv, the
    interpreter it points at, the task host and the task paths. Never raises:
    an unreadable venv only means python tasks will fail, not the daemon."""
    venv = Path(cfg.runners.python.venv)
    candidates = [venv, py_runner.TASK_HOST.parent, *cfg.runners.python.task_paths]
    try:
        for line in (venv / "pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home" and value.strip():
                candidates.append(Path(value.strip()).parent)
    except OSError:
        pass
    candidates.append(venv / "bin" / "python")
    paths = set()
    for path in candidates:
        try:
            real = Path(path).resolve()
        except OSError:
            continue
        paths.add(str(real.parent.parent if real.name.startswith("python") else real))
    return tuple(sorted(paths))
