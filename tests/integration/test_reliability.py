"""Crash recovery, resumable uploads, drain, cancellation, leases, SIGHUP, sweeper.

Every test drives a real miner process against the real mock coordinator and
kills, signals or starves it for real.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest

from aitbc_miner.sandbox.cgroups import JobCgroup, detect
from tests.support.jobs import pid_gone as gone
from tests.support.jobs import sh_job
from tests.support.jobs import wait_final as final
from tests.support.wait import wait_for


def alive(pid: int) -> bool:
    return not gone(pid)


def read_pid(path: Path) -> int:
    """The pid a job wrote into `path` (waits until the file has content)."""

    def content() -> str | None:
        return path.read_text().strip() if path.exists() else None

    return int(wait_for(content, timeout=20, what=str(path)))


def restart(miner_factory, mock, miner, **overrides):
    """A new miner process on the same workspace (same env), after `miner` died."""
    env = {k: v for k, v in miner.env.items() if k.startswith("AITBC_MINER_")}
    env.update(overrides)
    return miner_factory(mock, **env)


# -- crash recovery --------------------------------------------------------------------------


def test_crash_in_running_kills_leftovers_and_reports_e_crash(mock, miner, miner_factory):
    script = "sleep 300 & echo $! > child.pid; echo $$ > leader.pid; wait"
    mock.admin.enqueue(sh_job("crash-run", script), retry=False)
    child = read_pid(miner.workspace / "crash-run" / "work" / "child.pid")
    leader = read_pid(miner.workspace / "crash-run" / "work" / "leader.pid")
    miner.kill()  # SIGKILL: no cleanup at all
    # PR_SET_PDEATHSIG takes the job's leader down with the daemon (via the fork
    # server); its background child lives on until recovery finds it.
    wait_for(lambda: gone(leader), timeout=10, what="leader follows its daemon")
    assert alive(child), "a grandchild outlives the daemon: recovery must find it"
    second = restart(miner_factory, mock, miner)
    fail = final(mock, "crash-run")["fails"][-1]
    assert fail["error_code"] == "E_CRASH" and fail["retryable"] is True
    wait_for(lambda: gone(child) and gone(leader), timeout=10, what="leftovers killed")
    second.wait_event("recovery_finished")
    state = json.loads((second.workspace / "crash-run" / "state.json").read_text())
    assert state["phase"] == "RETRY_WAIT" and state["confirmed"] is True


def test_crash_in_prep_reports_e_crash(mock, miner, miner_factory):
    f = mock.admin.add_file("slow.bin", b"x" * 1000)
    mock.admin.fault(endpoint="files", latency_ms=[60_000, 60_000])
    mock.admin.enqueue(
        sh_job("crash-prep", "true", input={"urls": [{"url": f["url"], "path": "slow.bin"}]}),
        retry=False,
    )
    wait_for(
        lambda: (
            json.loads((miner.workspace / "crash-prep" / "state.json").read_text())["phase"]
            == "PREP"
        ),
        timeout=20,
        what="PREP",
    )
    miner.kill()
    mock.admin.clear_faults()
    restart(miner_factory, mock, miner)
    assert final(mock, "crash-prep")["fails"][-1]["error_code"] == "E_CRASH"


def test_crash_mid_chunked_upload_resumes_without_resending(mock, miner_factory, tmp_path):
    size = 200 * 1024 * 1024
    miner = miner_factory(mock, AITBC_MINER_UPLOAD__CHUNK_THRESHOLD_MB="8")
    mock.admin.fault(endpoint="uploads/put", latency_ms=[150, 150])
    mock.admin.enqueue(
        sh_job(
            "big-1",
            f"head -c {size} /dev/zero | tr '\\0' 'a' > big.bin",
            artifacts=[{"path": "big.bin", "max_mb": 300}],
        ),
        retry=False,
    )

    def upload() -> dict | None:
        ups = [u for u in mock.admin.uploads() if u.get("job_id") == "big-1"]
        return ups[0] if ups else None

    wait_for(
        lambda: (u := upload()) and u["received"] >= 40 * 1024 * 1024,
        timeout=60,
        what="40 MiB uploaded",
    )
    miner.kill()
    before = upload()
    assert before["received"] < size
    mock.admin.clear_faults()
    restart(miner_factory, mock, miner)
    job = final(mock, "big-1", timeout=90)
    assert job["state"] == "succeeded", job
    expected = hashlib.sha256(b"a" * size).hexdigest()
    assert job["result"]["artifacts"][0]["sha256"] == expected
    after = mock.admin.upload(before["upload_id"])
    # Only the part the coordinator did not have was sent again (at most one
    # chunk that was in flight when the miner died is repeated).
    assert after["bytes_put_total"] <= size + after.get("chunk_size", 4 * 1024 * 1024), after
    assert job["results_accepted"] == 1


def test_crash_before_result_confirmation_resends_same_key(mock, miner, miner_factory):
    # The coordinator accepts the result but the answer never reaches the miner.
    mock.admin.fault(endpoint="jobs/result", drop_rate=1.0, drop_after=True)
    mock.admin.enqueue(
        sh_job("unconfirmed", "echo data > out.txt", artifacts=[{"path": "out.txt"}]), retry=False
    )
    wait_for(lambda: mock.admin.job("unconfirmed")["results_accepted"] == 1, timeout=20)
    miner.kill()
    state = json.loads((miner.workspace / "unconfirmed" / "state.json").read_text())
    assert state["phase"] == "UPLOADING" and state["final_key"]
    mock.admin.clear_faults()
    restart(miner_factory, mock, miner)
    wait_for(
        lambda: json.loads((miner.workspace / "unconfirmed" / "state.json").read_text())[
            "confirmed"
        ],
        timeout=20,
        what="confirmed after restart",
    )
    job = mock.admin.job("unconfirmed")
    assert job["results_accepted"] == 1 and job["state"] == "succeeded"
    results = [c for c in job["history"] if c["endpoint"] == "jobs/result"]
    assert {c["idempotency_key"] for c in results} == {state["final_key"]}
    assert any(c["replayed"] for c in results), results


def test_crash_before_fail_confirmation_resends_same_key(mock, miner, miner_factory):
    mock.admin.fault(endpoint="jobs/fail", drop_rate=1.0, drop_after=True)
    mock.admin.enqueue(sh_job("fail-unconf", "exit 4"), retry=False)
    wait_for(lambda: len(mock.admin.job("fail-unconf")["fails"]) == 1, timeout=20)
    miner.kill()
    mock.admin.clear_faults()
    restart(miner_factory, mock, miner)
    wait_for(
        lambda: json.loads((miner.workspace / "fail-unconf" / "state.json").read_text())[
            "confirmed"
        ],
        timeout=20,
        what="confirmed after restart",
    )
    job = mock.admin.job("fail-unconf")
    assert len(job["fails"]) == 1 and job["fails"][0]["error_code"] == "E_EXIT"


def test_corrupt_state_is_quarantined_and_startup_goes_on(mock, tmp_path, miner_factory):
    root = tmp_path / "ws" / "jobs"
    (root / "half").mkdir(parents=True)
    (root / "half" / "state.json").write_text('{"version": 1, "job_id": "half", "ph')
    (root / "nostate").mkdir()
    miner = miner_factory(mock)
    miner.wait_event("workspace_quarantined")
    assert not (root / "half").exists() and not (root / "nostate").exists()
    assert len(list((root / ".quarantine").iterdir())) == 2
    mock.admin.enqueue(sh_job("after-q", "true"), retry=False)
    assert final(mock, "after-q")["state"] == "succeeded"


def test_empty_groups_a_crashed_daemon_left_are_removed_at_start(mock, miner_factory):
    """A crash between making a job's cgroup and recording it leaves an empty group."""
    support = detect("auto")
    if not support.active:
        pytest.skip(f"no writable cgroup here ({support.reason})")
    dead = 4_000_000
    while Path(f"/proc/{dead}").exists():
        dead -= 1
    leftovers = [
        JobCgroup.make(support, f"lost-1.a1.0a1b2c.{dead}-abcdef"),
        JobCgroup.make(support, f"warm-0.{dead}-abcdef"),
    ]
    try:
        miner_factory(mock).wait_event("cgroup_stale_removed")
        for group in leftovers:
            for path in [group.v2, *group.v1.values()]:
                assert path is None or not path.exists(), path
    finally:
        for group in leftovers:
            group.remove()


# -- drain -------------------------------------------------------------------------------


def test_drain_lets_running_job_finish_within_grace(mock, miner_factory):
    miner = miner_factory(mock, AITBC_MINER_SHUTDOWN__GRACE_S="30")
    mock.admin.enqueue(
        sh_job("drain-ok", "sleep 2; echo done > out.txt", artifacts=[{"path": "out.txt"}]),
        retry=False,
    )
    wait_for(lambda: mock.admin.job("drain-ok")["state"] == "acked", timeout=20)
    miner.signal(signal.SIGTERM)
    assert miner.proc.wait(timeout=30) == 0, miner.tail()
    assert mock.admin.job("drain-ok")["state"] == "succeeded"
    node = mock.admin.node("node-test")
    assert node["deregistered"] is True
    assert any(hb["body"]["state"] == "draining" for hb in node["heartbeats"])
    assert node["violations"] == 0, node["violation_log"]


def test_no_heartbeat_reaches_the_coordinator_after_deregister(mock, miner_factory):
    """A heartbeat in flight when the drain ends must land before the deregister."""
    miner = miner_factory(mock)
    wait_for(lambda: mock.admin.node("node-test")["heartbeats"], timeout=20, what="heartbeats")
    # The mock holds every heartbeat 0.8 s before handling it; the drain (no jobs)
    # wakes one at once and is over long before that.
    mock.admin.fault(endpoint="nodes/heartbeat", latency_ms=[800, 800])
    miner.signal(signal.SIGTERM)
    assert miner.proc.wait(timeout=30) == 0, miner.tail()
    node = mock.admin.node("node-test")
    assert node["deregistered"] is True
    assert node["heartbeats"][-1]["body"]["state"] == "draining"
    assert node["violations"] == 0, node["violation_log"]


def test_drain_cancels_job_past_grace(mock, miner_factory):
    miner = miner_factory(mock, AITBC_MINER_SHUTDOWN__GRACE_S="1")
    mock.admin.enqueue(sh_job("drain-late", "echo $$ > leader.pid; sleep 300"), retry=False)
    leader = read_pid(miner.workspace / "drain-late" / "work" / "leader.pid")
    miner.signal(signal.SIGTERM)
    assert miner.proc.wait(timeout=30) == 0, miner.tail()
    fail = mock.admin.job("drain-late")["fails"][-1]
    assert fail["error_code"] == "E_CANCELLED" and fail["retryable"] is True
    assert gone(leader)


def test_second_signal_cancels_at_once(mock, miner_factory):
    miner = miner_factory(mock, AITBC_MINER_SHUTDOWN__GRACE_S="300")
    mock.admin.enqueue(sh_job("drain-force", "echo $$ > leader.pid; sleep 300"), retry=False)
    leader = read_pid(miner.workspace / "drain-force" / "work" / "leader.pid")
    miner.signal(signal.SIGTERM)
    miner.wait_event("drain_started")
    miner.signal(signal.SIGINT)
    assert miner.proc.wait(timeout=20) == 0, miner.tail()
    assert mock.admin.job("drain-force")["fails"][-1]["error_code"] == "E_CANCELLED"
    assert gone(leader)


# -- cancellation and leases -------------------------------------------------------------------


def test_coordinator_cancel_stops_process_tree_keeps_workspace(mock, miner):
    script = "sleep 300 & echo $! > child.pid; echo $$ > leader.pid; wait"
    mock.admin.enqueue(sh_job("cancel-me", script), retry=False)
    child = read_pid(miner.workspace / "cancel-me" / "work" / "child.pid")
    mock.admin.cancel("cancel-me")
    job = final(mock, "cancel-me")
    assert job["state"] == "cancelled"
    assert job["fails"][-1]["error_code"] == "E_CANCELLED"
    wait_for(lambda: gone(child), timeout=10, what="child gone")
    assert (miner.workspace / "cancel-me" / "logs").is_dir()  # kept for triage


def test_heartbeats_keep_lease_alive_for_long_job(mock, miner):
    mock.admin.enqueue(sh_job("long-lease", "sleep 4"), lease_s=1.5, retry=False)
    job = final(mock, "long-lease", timeout=40)
    assert job["state"] == "succeeded" and job["attempt"] == 1, job


def test_lease_lost_on_progress_stops_job_without_reporting(mock, miner):
    script = "echo $$ > leader.pid; echo AITBC_PROGRESS 10 start; sleep 300"
    mock.admin.fault(endpoint="jobs/progress", error_rate=1.0, status=409)
    mock.admin.enqueue(sh_job("lost-lease", script), retry=False)
    leader = read_pid(miner.workspace / "lost-lease" / "work" / "leader.pid")
    miner.wait_event("job_finished", job_id="lost-lease", outcome="abandoned")
    assert gone(leader)
    calls = [c["endpoint"] for c in mock.admin.job("lost-lease")["history"]]
    assert "jobs/fail" not in calls and "jobs/result" not in calls


# -- allowlist reload ------------------------------------------------------------------------


def test_sighup_reloads_allowlist_without_dropping_running_jobs(mock, miner_factory, tmp_path):
    extra = tmp_path / "extra.d"
    extra.mkdir()
    miner = miner_factory(
        mock,
        AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES=json.dumps(
            [str(extra / "*.yaml"), str(tmp_path / "allowlist.test.d" / "*.yaml")]
        ),
    )
    mock.admin.enqueue(sh_job("hup-running", "sleep 3"), retry=False)
    mock.admin.enqueue(
        {"job_id": "hup-1", "runner": "cli", "timeout_s": 10, "command": "true"}, retry=False
    )
    assert final(mock, "hup-1")["fails"][-1]["error_code"] == "E_DENY"
    (extra / "true.yaml").write_text('command:\n  path: "/bin/true"\n')
    miner.signal(signal.SIGHUP)
    miner.wait_event("allowlist_reloaded")
    mock.admin.enqueue(
        {"job_id": "hup-2", "runner": "cli", "timeout_s": 10, "command": "true"}, retry=False
    )
    assert final(mock, "hup-2")["state"] == "succeeded"
    assert final(mock, "hup-running")["state"] == "succeeded"


# -- retention ---------------------------------------------------------------------------------


def test_sweeper_removes_finished_workspaces_only_after_keep(mock, miner_factory):
    miner = miner_factory(
        mock,
        AITBC_MINER_WORKSPACE__KEEP_SUCCESS="0",
        AITBC_MINER_WORKSPACE__KEEP_FAILED="1d",
        AITBC_MINER_WORKSPACE__SWEEP_INTERVAL_S="0.2",
    )
    mock.admin.enqueue(sh_job("sweep-ok", "true"), retry=False)
    mock.admin.enqueue(sh_job("sweep-bad", "exit 1"), retry=False)
    final(mock, "sweep-ok")
    final(mock, "sweep-bad")
    wait_for(lambda: not (miner.workspace / "sweep-ok").exists(), timeout=10, what="swept")
    assert (miner.workspace / "sweep-bad").exists()
