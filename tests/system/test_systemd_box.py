"""The miner under a real systemd (PID 1 in a systemd-nspawn box), installed by
scripts/install.sh, against the mock coordinator running in the same box.

One box per module; the tests run in file order and each leaves the unit as
the next one expects (the scenario of an operator's day). No fixed sleeps:
every wait is a condition with a deadline.
"""

from __future__ import annotations

import re
import time

from tests.support.wait import wait_for
from tests.system.conftest import BLOCK_FILE, DROPIN, SRC, UNIT, Scenario, install, miner_env
from tests.system.promtool import check_metrics, find_promtool


def sleep_job(job_id: str, seconds: int) -> dict:
    # the shipped `sleep` allowlist entry (allowlist.d/sleep.yaml)
    return {"job_id": job_id, "runner": "cli", "timeout_s": 120, "command": "sleep",
            "args": [str(seconds)]}  # fmt: skip


def test_installed_unit_verifies_clean_in_the_box(scenario: Scenario) -> None:
    # here ExecStart's venv really exists: nothing is rewritten for verify
    r = scenario.box.exec(
        "systemd-analyze", "verify", f"/usr/local/lib/systemd/system/{UNIT}", check=False
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_install_layout_and_modes(scenario: Scenario) -> None:
    b = scenario.box
    out = b.sh(
        "stat -c '%n %U:%G %a' /etc/aitbc/miner /etc/aitbc/miner/config.yaml "
        "/etc/aitbc/miner/miner.env /etc/aitbc/miner/allowlist.d/sleep.yaml "
        "/var/lib/aitbc/miner /var/lib/aitbc/miner/jobs /var/log/aitbc/miner "
        "/var/cache/aitbc/miner /usr/local/lib/aitbc/miner/tasks/example.py"
    ).stdout
    modes = dict(line.split(" ", 1) for line in out.splitlines())
    assert modes["/etc/aitbc/miner"] == "root:aitbc-miner 750"
    assert modes["/etc/aitbc/miner/config.yaml"] == "root:aitbc-miner 640"
    assert modes["/etc/aitbc/miner/miner.env"] == "root:root 600"
    assert modes["/etc/aitbc/miner/allowlist.d/sleep.yaml"] == "root:aitbc-miner 640"
    assert modes["/var/lib/aitbc/miner/jobs"] == "aitbc-miner:aitbc-miner 700"
    assert modes["/usr/local/lib/aitbc/miner/tasks/example.py"] == "root:root 644"
    assert (
        b.exec("getent", "passwd", "aitbc-miner").stdout.split(":")[6].strip().endswith("nologin")
    )
    link = b.exec("readlink", "/usr/local/lib/aitbc/miner/.venv").stdout.strip()
    assert link.startswith("venvs/")
    assert b.exec("cat", "/etc/logrotate.d/aitbc-miner").stdout.count("rotate 7") == 1


def test_reinstall_is_idempotent_and_keeps_edits(scenario: Scenario) -> None:
    b = scenario.box
    before = b.exec("readlink", "/usr/local/lib/aitbc/miner/.venv").stdout.strip()
    b.sh("echo '# edited by the operator' >> /etc/aitbc/miner/config.yaml")
    b.sh("echo '# edited by the operator' >> /etc/aitbc/miner/allowlist.d/gzip.yaml")
    env_before = b.exec("cat", "/etc/aitbc/miner/miner.env").stdout
    install(b)
    install(b)  # a third time: nothing piles up
    assert "edited by the operator" in b.exec("cat", "/etc/aitbc/miner/config.yaml").stdout
    assert (
        "edited by the operator" in b.exec("cat", "/etc/aitbc/miner/allowlist.d/gzip.yaml").stdout
    )
    assert (
        b.exec("test", "-f", "/etc/aitbc/miner/allowlist.d/gzip.yaml.dist", check=False).returncode
        == 0
    )
    # unedited shipped files are simply replaced, no .dist beside them
    assert (
        b.exec("test", "-e", "/etc/aitbc/miner/allowlist.d/sleep.yaml.dist", check=False).returncode
        != 0
    )
    assert b.exec("cat", "/etc/aitbc/miner/miner.env").stdout == env_before
    after = b.exec("readlink", "/usr/local/lib/aitbc/miner/.venv").stdout.strip()
    assert after != before
    venvs = b.exec("ls", "/usr/local/lib/aitbc/miner/venvs").stdout.split()
    assert len(venvs) == 2 and after.removeprefix("venvs/") in venvs  # current + rollback
    b.sh("sed -i '/edited by the operator/d' /etc/aitbc/miner/allowlist.d/gzip.yaml")


def test_enable_now_reaches_ready(scenario: Scenario) -> None:
    b = scenario.box
    b.exec("systemctl", "enable", "--now", UNIT, timeout=120)
    # Type=notify: `active (running)` is only reached once the daemon sent READY=1
    state = scenario.wait_active()
    assert re.match(r"running \d+, queued \d+, active", state["StatusText"]), state
    assert b.exec("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    registered = scenario.miner_events("EVENT=registered")
    assert registered and registered[-1]["NODE_ID"] == "node-box"
    assert registered[-1]["_UID"] != "0"  # runs as aitbc-miner
    status, body = scenario.health("/readyz")
    assert status == 200 and body["ready"], body


def test_the_hardened_unit_leaves_the_job_sandbox_intact(scenario: Scenario) -> None:
    # what the daemon found it can enforce, under every restriction of the unit:
    # per-job cgroups in the delegated subtree, a private network namespace via a
    # user namespace (RestrictNamespaces=user net), Landlock (SystemCallFilter)
    events = scenario.miner_events("EVENT=sandbox")
    assert events, "no `sandbox` capability line in the journal"
    sandbox = events[-1]
    assert "cgroup" in str(sandbox.get("TRACKING")), sandbox["MESSAGE"]
    assert "namespace" in str(sandbox.get("NETWORK")), sandbox["MESSAGE"]
    assert "NOT CONFINED" not in str(sandbox.get("FILESYSTEM")), sandbox["MESSAGE"]
    if "ABI" in str(sandbox.get("FILESYSTEM")) and int(str(sandbox["FILESYSTEM"]).split()[2]) >= 6:
        assert "own processes" in str(sandbox.get("SIGNALS")), sandbox["MESSAGE"]


def test_a_job_completes_and_the_journal_has_its_job_id(scenario: Scenario) -> None:
    job_id = scenario.enqueue(
        {"job_id": "box-echo-1", "runner": "cli", "timeout_s": 60, "command": "echo",
         "args": ["hello from the box"]},
        retry=False,
    )  # fmt: skip
    assert scenario.wait_final(job_id)["state"] == "succeeded"

    def finished() -> list[dict]:
        return scenario.miner_events(f"JOB_ID={job_id}", "EVENT=job_finished")

    (entry,) = wait_for(finished, timeout=20, what="job_finished in the journal")
    assert entry["PRIORITY"] == "6"
    assert entry["NODE_ID"] == "node-box"
    assert entry["OUTCOME"] == "done"
    assert entry["_SYSTEMD_UNIT"] == UNIT
    assert '"event": "job_finished"' in entry["MESSAGE"]


def test_health_and_metrics_in_the_box(scenario: Scenario) -> None:
    status, body = scenario.health("/healthz")
    assert status == 200 and body["alive"] is True and body["node_id"] == "node-box"
    status, metrics = scenario.box.http("GET", "http://127.0.0.1:9464/metrics")
    assert status == 200
    assert b'aitbc_miner_jobs_total{code="",outcome="done",runner="cli"}' in metrics
    # Warm starts work under the unit's restrictions (delegated cgroup2, namespaces).
    assert b'aitbc_miner_job_starts_total{start="warm"}' in metrics, metrics
    promtool, why = find_promtool()
    assert promtool is not None, f"promtool unavailable: {why}"
    checked = check_metrics(promtool, metrics)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_jsonl_log_file_and_logrotate_config(scenario: Scenario) -> None:
    b = scenario.box
    owner = b.exec("stat", "-c", "%U %a", "/var/log/aitbc/miner/miner.jsonl").stdout.split()
    assert owner == ["aitbc-miner", "600"]  # UMask=0077
    r = b.exec("logrotate", "--debug", "/etc/logrotate.d/aitbc-miner", check=False)
    assert r.returncode == 0, r.stderr
    assert "error" not in r.stderr.lower(), r.stderr
    r = b.exec("logrotate", "--force", "/etc/logrotate.d/aitbc-miner", check=False)
    assert r.returncode == 0, r.stderr
    assert b.exec("test", "-f", "/var/log/aitbc/miner/miner.jsonl.1").returncode == 0
    # the daemon reopens the renamed file: the next lines land in the fresh miner.jsonl
    job_id = scenario.enqueue(
        {"job_id": "box-echo-2", "runner": "cli", "timeout_s": 60, "command": "echo",
         "args": ["after rotation"]},
        retry=False,
    )  # fmt: skip
    assert scenario.wait_final(job_id)["state"] == "succeeded"
    wait_for(
        lambda: job_id in b.exec("cat", "/var/log/aitbc/miner/miner.jsonl").stdout,
        timeout=20, interval=0.2, what="new lines in miner.jsonl after rotation",
    )  # fmt: skip
    assert job_id not in b.exec("cat", "/var/log/aitbc/miner/miner.jsonl.1").stdout


def test_kill_9_restarts_and_reregisters(scenario: Scenario) -> None:
    b = scenario.box
    before = scenario.wait_active()
    registrations = len(scenario.miner_events("EVENT=registered"))
    # a short lease: without the miner, the mock requeues the job 3 s after the kill
    job_id = scenario.enqueue(sleep_job("box-kill-1", 3), lease_s=3)
    scenario.wait_running()
    b.exec("kill", "-9", before["MainPID"])
    after = wait_for(
        lambda: (s := scenario.wait_active(timeout=30))["MainPID"] != before["MainPID"] and s,
        timeout=60, what="a new main process",
    )  # fmt: skip
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    wait_for(
        lambda: len(scenario.miner_events("EVENT=registered")) > registrations,
        timeout=30, what="a new `registered` entry",
    )  # fmt: skip
    assert any("status=9/KILL" in line for line in scenario.systemd_lines())
    # the interrupted attempt never completes; the job ends final through a later attempt
    job = scenario.wait_final(job_id, timeout=90)
    assert job["state"] == "succeeded", job
    assert job["attempt"] >= 2, job
    assert job["attempts"][0]["outcome"] != "succeeded", job["attempts"]
    print(f"interrupted attempt ended: {job['attempts'][0]['outcome']}")


def test_a_hung_event_loop_is_restarted_by_the_watchdog(scenario: Scenario) -> None:
    b = scenario.box
    before = scenario.wait_active()
    watchdog_failures = len(b.journal(f"UNIT={UNIT}", "UNIT_RESULT=watchdog"))
    b.exec("touch", BLOCK_FILE)
    try:
        wait_for(
            lambda: scenario.miner_events(
                "EVENT=test_hook_blocking_event_loop", f"_PID={before['MainPID']}"
            ),
            timeout=20, what="the loop blocked by the test hook",
        )  # fmt: skip
    finally:
        b.exec("rm", "-f", BLOCK_FILE)  # the restarted daemon must not block again
    t0 = time.monotonic()
    wait_for(
        lambda: len(b.journal(f"UNIT={UNIT}", "UNIT_RESULT=watchdog")) > watchdog_failures,
        timeout=30, what="systemd: Failed with result 'watchdog'",
    )  # fmt: skip
    after = scenario.wait_active(timeout=30)
    assert after["MainPID"] != before["MainPID"]
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert time.monotonic() - t0 < 30  # WatchdogSec=6s in the test drop-in
    # PYTHONFAULTHANDLER: the stack of the hung process reached the journal
    dump = " ".join(str(e.get("MESSAGE", "")) for e in b.journal(f"_PID={before['MainPID']}"))
    assert "_block_if_asked" in dump, dump[-2000:]


def test_stop_lets_the_running_job_finish_then_stops_cleanly(scenario: Scenario) -> None:
    b = scenario.box
    scenario.wait_active()
    job_id = scenario.enqueue(sleep_job("box-drain-1", 5), retry=False)
    scenario.wait_running()
    t0 = time.monotonic()
    b.exec("systemctl", "stop", UNIT, timeout=120)  # returns when the unit is down
    took = time.monotonic() - t0
    job = scenario.job(job_id)
    assert job["state"] == "succeeded" and job["attempt"] == 1, job  # finished, not cancelled
    assert took < 60, f"stop took {took:.1f}s, longer than the test's grace_s=60"
    s = scenario.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert s["ActiveState"] == "inactive" and s["Result"] == "success", s
    assert s["ExecMainStatus"] == "0", s
    events = [e["EVENT"] for e in scenario.miner_events() if "EVENT" in e]
    tail = events[len(events) - events[::-1].index("drain_started") - 1 :]
    for expected in ("job_finished", "deregistered", "miner_stopped"):
        assert expected in tail, tail


def test_disable_and_uninstall_leave_no_unit(scenario: Scenario) -> None:
    b = scenario.box
    b.exec("rm", "-f", DROPIN)
    b.exec("systemctl", "daemon-reload")
    b.exec("systemctl", "start", UNIT, timeout=120)
    scenario.wait_active()
    b.exec("systemctl", "disable", "--now", UNIT, timeout=120)
    assert scenario.show("ActiveState")["ActiveState"] == "inactive"
    b.exec("/bin/bash", f"{SRC}/scripts/install.sh", "--uninstall", timeout=120)
    assert scenario.show("LoadState")["LoadState"] == "not-found"
    files = b.exec(
        "systemctl", "list-unit-files", "--no-legend", "aitbc-miner*", check=False
    ).stdout
    assert files.strip() == ""
    assert b.exec("test", "-e", "/usr/local/lib/aitbc/miner", check=False).returncode != 0
    assert b.exec("test", "-e", "/etc/logrotate.d/aitbc-miner", check=False).returncode != 0
    # kept by policy: config + token, state, logs, cache and the user owning them
    assert b.exec("test", "-f", "/etc/aitbc/miner/miner.env").returncode == 0
    owned = b.sh("find / -xdev -user aitbc-miner -print").stdout.split()
    allowed = ("/var/lib/aitbc/miner", "/var/log/aitbc/miner", "/var/cache/aitbc/miner")
    stray = [p for p in owned if not p.startswith(allowed)]
    assert not stray, f"aitbc-miner owns files outside the documented places: {stray}"
    b.exec("/bin/bash", f"{SRC}/scripts/install.sh", "--uninstall", "--purge", timeout=120)
    assert b.exec("getent", "passwd", "aitbc-miner", check=False).returncode != 0
    for path in ("/etc/aitbc", "/var/lib/aitbc", "/var/log/aitbc", "/var/cache/aitbc"):
        assert b.exec("test", "-e", path, check=False).returncode != 0, path
    assert b.sh("find / -xdev -nouser -print").stdout.strip() == ""


def test_wheel_install_with_prefix_and_config(scenario: Scenario) -> None:
    """The other install path: a wheel, a non-default --prefix and an operator's --config."""
    b = scenario.box
    prefix = "/opt/aitbc-miner"
    b.sh(
        "set -e; rm -rf /tmp/src /tmp/dist /tmp/wb; mkdir /tmp/src; "
        f"cp -r {SRC}/pyproject.toml {SRC}/README.md {SRC}/aitbc_miner {SRC}/mock_coordinator "
        "/tmp/src/; python3 -m venv /tmp/wb; "
        "/tmp/wb/bin/python -m pip wheel -q --no-index --find-links /opt/aitbc/wheels "
        "--no-deps -w /tmp/dist /tmp/src",
        timeout=300,
    )
    wheel = b.sh("ls /tmp/dist/aitbc_miner-*.whl").stdout.strip()
    config = b.exec("cat", f"{SRC}/etc/config.yaml").stdout.replace(
        'listen: "127.0.0.1:9464"', 'listen: "127.0.0.1:9465"'
    )
    assert "127.0.0.1:9465" in config
    b.write("/tmp/operator-config.yaml", config)
    install(b, "--wheel", wheel, "--prefix", prefix, "--config", "/tmp/operator-config.yaml")
    unit = b.exec("cat", f"/usr/local/lib/systemd/system/{UNIT}").stdout
    assert f"ExecStart={prefix}/.venv/bin/python -m aitbc_miner run" in unit
    assert "/usr/local/lib/aitbc/miner" not in unit
    installed = b.exec("cat", "/etc/aitbc/miner/config.yaml").stdout
    assert f'"{prefix}/tasks"' in installed and "127.0.0.1:9465" in installed
    assert b.exec("test", "-f", f"{prefix}/tasks/example.py").returncode == 0
    b.write("/etc/aitbc/miner/miner.env", miner_env(scenario.public_key), "0600")
    b.exec("systemctl", "start", UNIT, timeout=120)
    scenario.wait_active()
    status, raw = b.http("GET", "http://127.0.0.1:9465/readyz")
    assert status == 200, raw
    b.exec("/bin/bash", f"{SRC}/scripts/install.sh", "--uninstall", "--purge", "--prefix", prefix)
    assert scenario.show("LoadState")["LoadState"] == "not-found"
    assert b.exec("test", "-e", prefix, check=False).returncode != 0
