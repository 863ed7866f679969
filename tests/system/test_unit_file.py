"""The shipped unit: `systemd-analyze verify` clean, `security` exposure <= 2.0, the
directives the issue asks for, and a comment for every directive left weaker.

`systemd-analyze verify` and `security --offline=true` need no running systemd;
these tests run on any host that has systemd-analyze (skip, loudly, otherwise).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "aitbc-miner.service"
EXPOSURE_LIMIT = 2.0
VENV_PYTHON = "/usr/local/lib/aitbc/miner/.venv/bin/python"


@pytest.fixture(scope="module")
def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        message = "SYSTEMD-ANALYZE NOT FOUND: unit verify/security NOT checked (apt: systemd)"
        if os.environ.get("AITBC_SYSTEM_TEST") == "require":
            pytest.fail(message)
        pytest.skip(message)
    return path


def directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(min|ms|s|h)?", value):
        total += float(number) * {"min": 60, "h": 3600, "ms": 0.001}.get(unit, 1)
    return total


def test_verify_is_clean(analyze: str, tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at an interpreter that
    # does, leaving every other line as shipped.
    unit = tmp_path / "aitbc-miner.service"
    python = shutil.which("python3") or "/usr/bin/python3"
    unit.write_text(UNIT.read_text().replace(VENV_PYTHON, python))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "", f"systemd-analyze verify warned:\n{r.stderr}"


def security(analyze: str) -> str:
    r = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_exposure_at_most_2_0(analyze: str) -> None:
    out = security(analyze)
    match = re.search(r"Overall exposure level for aitbc-miner\.service: ([0-9.]+)", out)
    assert match, out[-500:]
    exposure = float(match.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= EXPOSURE_LIMIT, out


def test_every_weaker_directive_is_commented(analyze: str) -> None:
    lines = UNIT.read_text().splitlines()
    comments = "\n".join(line for line in lines if line.startswith("#"))
    weaker = [
        line.split()[1]
        for line in security(analyze).splitlines()
        if line.startswith("✗ ") and len(line.split()) > 1
    ]
    assert weaker, "no weaker directives parsed from systemd-analyze security"
    uncommented = []
    for item in weaker:
        name = re.split(r"[=~]", item, maxsplit=1)[0]
        preceded = any(
            line.startswith(f"{name}=") and i > 0 and lines[i - 1].startswith("#")
            for i, line in enumerate(lines)
        )
        if name not in comments and not preceded:
            uncommented.append(item)
    assert not uncommented, f"weaker directives without a comment saying why: {uncommented}"


def test_issue_directives() -> None:
    d = directives(UNIT.read_text())
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert seconds(one["WatchdogSec"]) > 0
    assert one["Restart"] == "always"
    assert seconds(one["RestartSec"]) >= 1
    assert "StartLimitIntervalSec" in one and int(one["StartLimitBurst"]) >= 1
    assert one["KillMode"] == "mixed"
    assert one["Delegate"] == "yes"
    assert one["User"] == one["Group"] == "aitbc-miner"
    assert one["UMask"] == "0077"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["EnvironmentFile"] == "-/etc/aitbc/miner/miner.env"
    for key in ("StateDirectory", "LogsDirectory", "CacheDirectory", "ConfigurationDirectory"):
        assert one[key] == "aitbc/miner", key
    assert any(v.startswith("char-nvidia") for v in d["DeviceAllow"])
    assert one["PrivateDevices"] == "no"  # GPUs stay visible
    assert one["ProcSubset"] != "pid"  # psutil
    assert not any("~@resources" in v for v in d["SystemCallFilter"])  # nice/ionice
    assert set(one["RestrictNamespaces"].split()) >= {"user", "net"}  # job network isolation
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "LockPersonality"):
        assert one[key] == "yes", key
    assert one["MemoryDenyWriteExecute"] == "yes"
    assert one["ProtectSystem"] == "strict"
    assert one["CapabilityBoundingSet"] == ""


def test_no_secret_in_the_unit() -> None:
    text = UNIT.read_text()
    assert not re.search(r"^Environment=.*MINER_AUTH", text, re.M)
    assert "TOKEN" not in "\n".join(v for v in directives(text).get("Environment", []))


def test_stop_timeout_covers_the_production_grace() -> None:
    cfg = yaml.safe_load((REPO / "etc" / "config.yaml").read_text())
    shutdown = cfg["shutdown"]
    grace = float(shutdown["grace_s"]) + float(shutdown.get("kill_grace_s", 10)) + 30
    stop = seconds(directives(UNIT.read_text())["TimeoutStopSec"][-1])
    assert stop >= grace, f"TimeoutStopSec={stop}s < grace_s + kill_grace_s + reports = {grace}s"


def test_watchdog_interval_leaves_room_for_the_ping_cadence() -> None:
    # the daemon pings every WatchdogSec/2; a second missed ping is the kill
    d = directives(UNIT.read_text())
    assert seconds(d["WatchdogSec"][-1]) >= 10
