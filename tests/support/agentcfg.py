"""A MinerConfig for in-process Agent tests: no health port, no cgroups, temp dirs."""

from __future__ import annotations

from pathlib import Path

from aitbc_miner.config import MinerConfig, load_config


def agent_config(root: Path, **env: str) -> MinerConfig:
    """Defaults for an Agent driven through httpx.MockTransport; `env` overrides."""
    environ = {
        "MINER_AUTH": "test-bootstrap",
        "AITBC_MINER_COORDINATOR__BASE_URL": "http://127.0.0.1:9/api/v1",
        "AITBC_MINER_WORKSPACE__ROOT": str(root / "jobs"),
        "AITBC_MINER_CACHE__ROOT": str(root / "cache"),
        "AITBC_MINER_HEALTH__LISTEN": "",
        "AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES": "[]",
        **env,
    }
    return load_config(None, environ)
