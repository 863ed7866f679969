"""Start a real `aitbc-miner run` process against a mock coordinator (tests only)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .procs import kill_process, stop_process
from .wait import wait_for

REPO = Path(__file__).resolve().parents[2]
DEV_CONFIG = REPO / "etc" / "config.dev.yaml"
BOOTSTRAP = "dev-bootstrap-token"


@dataclass
class MinerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    workspace: Path
    node_id: str
    env: dict[str, str] = field(default_factory=dict)

    def events(self) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return out
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
        return out

    def find(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items())
        ]

    def wait_event(self, event: str, timeout: float = 20.0, **match: Any) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"miner exited with {self.proc.returncode}:\n{self.tail()}")
            found = self.find(event, **match)
            return found[-1] if found else None

        try:
            return wait_for(check, timeout=timeout, what=f"miner event {event} {match}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- miner log tail ---\n{self.tail()}") from None

    @property
    def health_url(self) -> str:
        started = self.wait_event("miner_started")
        return started["health"][0]

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        return stop_process(self.proc, timeout)

    def kill(self) -> None:
        kill_process(self.proc)


def miner_env(
    tmp_path: Path, mock: Any, *, node_id: str = "node-test", **overrides: str
) -> dict[str, str]:
    """Environment for a miner using the dev config against `mock`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_")}
    env.update(
        {
            "MINER_AUTH": BOOTSTRAP,
            "AITBC_MINER_NODE_ID": node_id,
            "AITBC_MINER_COORDINATOR__BASE_URL": mock.url
            if mock is not None
            else "http://127.0.0.1:9/api/v1",
            "AITBC_MINER_WORKSPACE__ROOT": str(tmp_path / "ws" / "jobs"),
            "AITBC_MINER_CACHE__ROOT": str(tmp_path / "ws" / "cache"),
            "AITBC_MINER_HEALTH__LISTEN": "127.0.0.1:0",
            "AITBC_MINER_HEARTBEAT__INTERVAL_S": "1",
            "AITBC_MINER_HEARTBEAT__BACKOFF__MIN_S": "0.1",
            "AITBC_MINER_HEARTBEAT__BACKOFF__MAX_S": "1",
            "AITBC_MINER_COORDINATOR__PULL_WAIT_S": "5",
            "AITBC_MINER_SHUTDOWN__KILL_GRACE_S": "2",
            "AITBC_MINER_LOGGING__LEVEL": "debug",
        }
    )
    if mock is not None:
        env["AITBC_MINER_SECURITY__MANIFEST_KEYS"] = json.dumps({mock.key_id: mock.public_key})
    env.update(overrides)
    return env


def start_miner(
    tmp_path: Path,
    mock: Any,
    *,
    config: Path = DEV_CONFIG,
    node_id: str = "node-test",
    wait_registered: bool = True,
    launcher: str = "aitbc_miner",
    user: str | None = None,
    **overrides: str,
) -> MinerProcess:
    """`launcher` is the module run with -m, e.g. "tests.support.fake_nvml_launcher".

    `user` runs the miner unprivileged (e.g. "nobody"), as the hardened unit
    does: with Debian's /usr/bin/python3 (same ABI as the venv, whose own
    interpreter may live under an unreadable /root) and the venv's packages.
    """
    env = miner_env(tmp_path, mock, node_id=node_id, **overrides)
    python = sys.executable
    if user is not None:
        python = "/usr/bin/python3"
        site = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
        env["PYTHONPATH"] = f"{site}:{REPO}"
    log_path = tmp_path / f"miner-{node_id}.log"
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen(
            [python, "-m", launcher, "run", "--config", str(config)],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            user=user,
            group="nogroup" if user is not None else None,
            extra_groups=[] if user is not None else None,
        )
    miner = MinerProcess(proc, log_path, Path(env["AITBC_MINER_WORKSPACE__ROOT"]), node_id, env)
    if wait_registered and mock is not None:
        miner.wait_event("registered")
    return miner
