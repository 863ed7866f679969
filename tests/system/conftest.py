"""System-test fixtures: a booted box with the miner installed by scripts/install.sh.

`make test` runs these when the machine can boot a container (root,
systemd-nspawn and debootstrap present or installable, the Debian mirror
reachable) and otherwise SKIPS them with a loud reason. `make system-test`
sets AITBC_SYSTEM_TEST=require: then a box that cannot be had is a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.wait import wait_for
from tests.system import box as boxlib
from tests.system.box import Box, BoxError

MOCK_PORT = 8080
MOCK = f"http://127.0.0.1:{MOCK_PORT}"
HEALTH = "http://127.0.0.1:9464"
UNIT = "aitbc-miner.service"
SRC = "/opt/aitbc/src"
WHEELS = "/opt/aitbc/wheels"
BLOCK_FILE = "/run/aitbc-test/block-loop"
DROPIN = f"/run/systemd/system/{UNIT}.d/50-test.conf"
# Test-only drop-in (in /run: gone with the box, never part of the install):
# a short watchdog so the hung-loop test takes seconds, a quick restart, and
# the test hook that lets the test block the event loop.
DROPIN_TEXT = f"""[Service]
WatchdogSec=6s
RestartSec=1s
Environment=AITBC_TEST_BLOCK_LOOP_FILE={BLOCK_FILE}
"""


def required() -> bool:
    return os.environ.get("AITBC_SYSTEM_TEST") == "require"


def not_available(why: str) -> None:
    message = f"SYSTEM TEST NOT RUN: cannot boot a systemd box here: {why}"
    if required():
        pytest.fail(message, pytrace=False)
    print(f"\n{'*' * 78}\n*** {message}\n{'*' * 78}", file=sys.stderr)
    pytest.skip(message)


def miner_env(public_key: str) -> str:
    """miner.env as an operator would write it: the token, plus overrides for a test
    node (fast heartbeats, loopback mock, no GPU probing, its signing key pinned)."""
    keys = json.dumps({"mock-ed25519": public_key})
    return f"""MINER_AUTH=dev-bootstrap-token
AITBC_MINER_NODE_ID=node-box
AITBC_MINER_COORDINATOR__BASE_URL={MOCK}/api/v1
AITBC_MINER_COORDINATOR__TIMEOUT_S=5
AITBC_MINER_COORDINATOR__PULL_WAIT_S=5
AITBC_MINER_HEARTBEAT__INTERVAL_S=1
AITBC_MINER_HEARTBEAT__BACKOFF__MIN_S=0.2
AITBC_MINER_HEARTBEAT__BACKOFF__MAX_S=2
AITBC_MINER_GPU__ENABLE=false
AITBC_MINER_WORKSPACE__MIN_FREE_MB=64
AITBC_MINER_SHUTDOWN__GRACE_S=60
AITBC_MINER_SECURITY__MANIFEST_KEYS='{keys}'
"""


@dataclass
class Scenario:
    """The booted box with the miner installed and the mock coordinator running in it."""

    box: Box
    public_key: str

    # systemd

    def show(self, *props: str) -> dict[str, str]:
        return self.box.show(UNIT, *props)

    def wait_active(self, timeout: float = 60) -> dict[str, str]:
        def active() -> dict[str, str] | None:
            s = self.show("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText")
            return s if s["ActiveState"] == "active" and s["SubState"] == "running" else None

        return wait_for(active, timeout=timeout, interval=0.2, what=f"{UNIT} active")

    def miner_events(self, *matches: str) -> list[dict[str, Any]]:
        """The daemon's own journal entries (not systemd's lines about the unit)."""
        return self.box.journal(f"_SYSTEMD_UNIT={UNIT}", "SYSLOG_IDENTIFIER=aitbc-miner", *matches)

    def systemd_lines(self) -> list[str]:
        return [str(e.get("MESSAGE", "")) for e in self.box.journal(f"UNIT={UNIT}", "_PID=1")]

    # HTTP inside the box

    def health(self, path: str) -> tuple[int, dict[str, Any]]:
        status, raw = self.box.http("GET", f"{HEALTH}{path}")
        return status, json.loads(raw) if raw.startswith(b"{") else {}

    def enqueue(self, job: dict[str, Any], **opts: Any) -> str:
        reply = self.box.http_json("POST", f"{MOCK}/admin/jobs", {"job": job, **opts})
        return reply["id"]  # type: ignore[index]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.box.http_json("GET", f"{MOCK}/admin/jobs/{job_id}")  # type: ignore[return-value]

    def wait_final(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        final = ("succeeded", "failed", "cancelled", "expired")
        return wait_for(
            lambda: (j := self.job(job_id))["state"] in final and j,
            timeout=timeout, interval=0.3, what=f"job {job_id} final at the mock",
        )  # fmt: skip

    def wait_running(self, count: int = 1, timeout: float = 30) -> None:
        wait_for(
            lambda: self.health("/healthz")[1].get("running") == count,
            timeout=timeout, interval=0.2, what=f"{count} job(s) running",
        )  # fmt: skip


def install(b: Box, *extra: str) -> str:
    r = b.exec(
        "/bin/bash", f"{SRC}/scripts/install.sh", "--find-links", WHEELS, "--no-apt", *extra,
        timeout=300,
    )  # fmt: skip
    return r.stdout + r.stderr


def start_mock(b: Box) -> str:
    b.exec(
        "systemd-run", "--unit=aitbc-mock", "--quiet",
        f"--property=Environment=PYTHONPATH={SRC} PYTHONDONTWRITEBYTECODE=1",
        f"{boxlib.TEST_VENV}/bin/python", "-m", "mock_coordinator",
        "--port", str(MOCK_PORT), "--ready-file", "/run/aitbc-mock.json",
    )  # fmt: skip

    def ready() -> dict[str, Any] | None:
        r = b.exec("cat", "/run/aitbc-mock.json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 and r.stdout.strip() else None

    info = wait_for(ready, timeout=30, interval=0.2, what="mock coordinator ready in the box")
    return str(info["public_key"])


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    reason = boxlib.unavailable_reason()
    if reason:
        not_available(reason)
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(boxlib.cache_lock())
            boxlib.prepare()
            b = Box({boxlib.REPO: SRC, boxlib.WHEELS: WHEELS})
            b.start()
        except BoxError as exc:
            not_available(str(exc))
        stack.callback(_shut_down, b, t0)
        boxlib.log(f"box ready in {time.monotonic() - t0:.1f}s (prepare + boot)")
        install(b)
        public_key = start_mock(b)
        b.write("/etc/aitbc/miner/miner.env", miner_env(public_key), "0600")
        b.write(DROPIN, DROPIN_TEXT)
        b.exec("mkdir", "-p", str(Path(BLOCK_FILE).parent))
        b.exec("systemctl", "daemon-reload")
        boxlib.log(f"installed in {time.monotonic() - t0:.1f}s")
        yield Scenario(b, public_key)


def _shut_down(b: Box, t0: float) -> None:
    """Always: keep the box's last journal lines for a post-mortem, stop it, clean up."""
    try:
        if b.leader() is not None:
            r = b.exec("journalctl", "--no-pager", "-n", "200", "-o", "cat", check=False)
            (boxlib.CACHE / "last-journal.txt").write_text(r.stdout)
    finally:
        b.stop()
        boxlib.log(f"box session took {time.monotonic() - t0:.1f}s")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.system)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say it at the end, where nobody misses it, when system tests did not run."""
    reasons = sorted(
        {
            str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
            for report in terminalreporter.stats.get("skipped", [])
            if "tests/system" in report.nodeid
        }
    )
    if reasons:
        terminalreporter.write_sep("!", "SYSTEM TESTS SKIPPED", red=True, bold=True)
        for reason in reasons:
            terminalreporter.write_line(reason.removeprefix("Skipped: "), red=True)
        terminalreporter.write_line("`make system-test` (as root) runs them or says why it can't.")
