"""Recovery scan, quarantine, group-kill safety and the retention sweeper (real files)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest

from aitbc_miner.journal import JobState, current_boot_id, save_state
from aitbc_miner.lifecycle import Phase, Recovery
from aitbc_miner.recovery import job_group_members, kill_leftovers, scan, sweep, sweep_due

DAY = 86400.0


def state(phase: Phase, confirmed: bool = False, **kw) -> JobState:
    return JobState(
        job_id=kw.pop("job_id", "j1"), attempt=1, phase=phase, confirmed=confirmed, **kw
    )


@pytest.mark.parametrize(
    ("phase", "confirmed", "age", "due"),
    [
        (Phase.DONE, True, 100, True),
        (Phase.DONE, True, 5, False),
        (Phase.FAILED, True, 100, False),  # keep_failed is longer
        (Phase.FAILED, True, DAY + 1, True),
        (Phase.RETRY_WAIT, True, DAY + 1, True),
        (Phase.ABANDONED, False, DAY + 1, True),
        (Phase.FAILED, False, 10 * DAY, False),  # unconfirmed: recovery's business
        (Phase.DONE, False, 10 * DAY, False),
        (Phase.RUNNING, False, 10 * DAY, False),
        (Phase.UPLOADING, True, 10 * DAY, False),
        (Phase.ACKED, False, 10 * DAY, False),
    ],
)
def test_sweep_due(phase, confirmed, age, due):
    now = 1_000_000.0
    assert sweep_due(state(phase, confirmed, updated_at=now - age), now, 60, DAY) is due


def write(root: Path, name: str, st: JobState) -> Path:
    d = root / name
    (d / "work").mkdir(parents=True)
    save_state(d, st)
    return d


def test_scan_decides_and_quarantines(tmp_path):
    write(tmp_path, "run", state(Phase.RUNNING, job_id="run"))
    write(tmp_path, "up", state(Phase.UPLOADING, job_id="up"))
    write(tmp_path, "failed", state(Phase.FAILED, job_id="failed", final_key="k"))
    write(tmp_path, "done", state(Phase.DONE, True, job_id="done"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "state.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "run")
    found = {f.state.job_id: f.action for f in scan(tmp_path)}
    assert found == {
        "run": Recovery.KILL_AND_REPORT_CRASH,
        "up": Recovery.RESUME_UPLOAD,
        "failed": Recovery.RESEND_FINAL,
        "done": Recovery.LEAVE,
    }
    assert not (tmp_path / "corrupt").exists() and not (tmp_path / "empty").exists()
    assert sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / ".quarantine").iterdir()) == [
        "corrupt",
        "empty",
    ]
    assert (tmp_path / "link").is_symlink()  # never followed, never moved


def test_sweep_removes_only_due_and_never_follows_symlinks(tmp_path):
    root = tmp_path / "jobs"
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("operator data")
    old = time.time() - 2 * DAY
    d = write(root, "old-done", state(Phase.DONE, True, job_id="old-done", updated_at=old))
    (d / "work" / "escape").symlink_to(outside)
    write(root, "old-running", state(Phase.RUNNING, job_id="old-running", updated_at=old))
    write(root, "new-done", state(Phase.DONE, True, job_id="new-done", updated_at=time.time()))
    (root / "dangling").symlink_to(outside)
    assert sweep(root, keep_success_s=DAY, keep_failed_s=7 * DAY) == 1
    assert not (root / "old-done").exists()
    assert (root / "old-running").exists() and (root / "new-done").exists()
    assert (outside / "keep.txt").read_text() == "operator data"
    assert (root / "dangling").is_symlink()


def test_kill_leftovers_kills_only_a_provable_job_group(tmp_path):
    job_dir = tmp_path / "j1"
    (job_dir / "work").mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin", "AITBC_JOB_ID": "j1"}
    proc = subprocess.Popen(["sleep", "300"], cwd=job_dir / "work", env=env, start_new_session=True)
    stranger = subprocess.Popen(
        ["sleep", "300"], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, start_new_session=True
    )
    try:
        st = state(Phase.RUNNING, job_id="j1", pgid=proc.pid, boot_id=current_boot_id())
        # A group that is not the job's (no AITBC_JOB_ID, cwd elsewhere) is never touched,
        # and neither is any group when the boot id differs.
        assert job_group_members(st.evolve(pgid=stranger.pid), job_dir) == []
        assert job_group_members(st.evolve(boot_id="another-boot"), job_dir) == []
        assert job_group_members(st.evolve(pgid=None), job_dir) == []
        assert kill_leftovers(st, job_dir) == 1
        assert not psutil.pid_exists(proc.pid)  # killed and reaped (we are its parent)
        assert stranger.poll() is None
    finally:
        for p in (proc, stranger):
            if p.poll() is None:
                p.kill()
                p.wait()
