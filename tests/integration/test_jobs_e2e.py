"""End to end: a real miner process runs jobs from the real mock coordinator."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import psutil

from tests.support.jobs import cli_job, last_fail, wait_final
from tests.support.wait import wait_for


def test_cli_job_uploads_artifact_with_right_sha256(mock, miner):
    text = "hello aitbc\n" * 100
    mock.admin.enqueue(
        cli_job(
            "cli-1",
            "gzip",
            ["-k", "-f", "-n", "input.txt"],
            input={"inline": {"input.txt": text}},
            artifacts=[{"path": "input.txt.gz", "type": "application/gzip"}],
        ),
        retry=False,
    )
    job = wait_final(mock, "cli-1")
    assert job["state"] == "succeeded", job
    data = mock.admin.artifact("cli-1", "input.txt.gz")
    assert gzip.decompress(data).decode() == text
    meta = job["result"]["artifacts"][0]
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["size"] == len(data)
    finished = miner.wait_event("job_finished", job_id="cli-1")
    assert finished["outcome"] == "done" and finished["error_code"] is None


def test_python_job_runs_task_in_child_process(mock, miner):
    mock.admin.enqueue(
        {
            "job_id": "py-1",
            "runner": "python",
            "timeout_s": 60,
            "task": "example",
            "params": {"input": "doc.txt", "transform": "upper", "output": "up.txt"},
            "input": {"inline": {"doc.txt": "abc\ndef\n"}},
            "artifacts": [{"path": "up.txt", "type": "text/plain"}, {"path": "result.json"}],
        },
        retry=False,
    )
    job = wait_final(mock, "py-1")
    assert job["state"] == "succeeded", job
    assert mock.admin.artifact("py-1", "up.txt") == b"ABC\nDEF\n"
    result = json.loads(mock.admin.artifact("py-1", "result.json"))
    assert result["input_sha256"] == hashlib.sha256(b"abc\ndef\n").hexdigest()
    by_path = {a["path"]: a for a in job["result"]["artifacts"]}
    assert by_path["up.txt"]["sha256"] == hashlib.sha256(b"ABC\nDEF\n").hexdigest()
    # run(**params) ran in a child, not in the daemon
    assert miner.proc.poll() is None


def test_python_task_exception_is_e_exit_with_traceback(mock, miner):
    mock.admin.enqueue(
        {
            "job_id": "py-bad",
            "runner": "python",
            "timeout_s": 60,
            "task": "example",
            "params": {"input": "doc.txt", "transform": "nope"},
            "input": {"inline": {"doc.txt": "x"}},
        },
        retry=False,
    )
    job = wait_final(mock, "py-bad")
    fail = last_fail(job)
    assert fail["error_code"] == "E_EXIT"
    assert "ValueError" in fail["logs_tail"] and "unknown transform" in fail["logs_tail"]


def test_denied_command_is_e_deny_and_nothing_runs(mock, miner):
    mock.admin.enqueue(cli_job("deny-1", "narrow", ["evil-marker"]), retry=False)
    mock.admin.enqueue(cli_job("deny-2", "rm", ["-rf", "/"]), retry=False)
    mock.admin.enqueue(
        cli_job("deny-3", "sh", ["-c", "touch env-marker"], env={"LD_PRELOAD": "/tmp/x.so"}),
        retry=False,
    )
    for job_id in ("deny-1", "deny-2", "deny-3"):
        assert last_fail(wait_final(mock, job_id))["error_code"] == "E_DENY", job_id
    ws = miner.workspace
    assert not list(ws.glob("*/work/evil-marker"))
    assert not list(ws.glob("*/work/env-marker"))


def test_invalid_manifests_are_e_invalid_and_daemon_keeps_serving(mock, miner):
    mock.admin.enqueue(cli_job("bad/id", "sh", ["-c", "touch x"]), retry=False)
    mock.admin.enqueue(
        cli_job("bad-path", "sh", ["-c", "true"], artifacts=[{"path": "../../x"}]), retry=False
    )
    mock.admin.enqueue({"job_id": "no-timeout", "runner": "cli", "command": "sh"}, retry=False)
    mock.admin.enqueue(cli_job("bad-type", "sh", ["-c", "true"], timeout_s="10"), retry=False)
    for job_id in ("bad/id", "bad-path", "no-timeout", "bad-type"):
        assert last_fail(wait_final(mock, job_id))["error_code"] == "E_INVALID", job_id
    mock.admin.enqueue(cli_job("after-bad", "sh", ["-c", "echo fine"]), retry=False)
    assert wait_final(mock, "after-bad")["state"] == "succeeded"
    assert miner.proc.poll() is None


def test_unsigned_and_tampered_jobs_are_e_signature(mock, miner):
    mock.admin.enqueue(cli_job("unsigned", "sh", ["-c", "touch ran"]), sign="none", retry=False)
    mock.admin.enqueue(cli_job("tampered", "sh", ["-c", "touch ran"]), sign="tamper", retry=False)
    for job_id in ("unsigned", "tampered"):
        assert last_fail(wait_final(mock, job_id))["error_code"] == "E_SIGNATURE", job_id
    assert not list(miner.workspace.glob("*/work/ran"))


def test_timeout_kills_the_whole_process_group(mock, miner, tmp_path: Path):
    script = "sleep 300 & echo $! > grandchild.pid; sleep 300"
    mock.admin.enqueue(cli_job("slow-1", "sh", ["-c", script], timeout_s=2), retry=False)
    job = wait_final(mock, "slow-1")
    assert last_fail(job)["error_code"] == "E_TIMEOUT"
    pid_file = next(miner.workspace.glob("slow-1/work/grandchild.pid"))
    pid = int(pid_file.read_text())

    def gone() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(gone, timeout=10, what=f"grandchild {pid} gone")


def test_nonzero_exit_is_e_exit_with_log_tail(mock, miner):
    mock.admin.enqueue(cli_job("exit-3", "sh", ["-c", "echo boom >&2; exit 3"]), retry=False)
    fail = last_fail(wait_final(mock, "exit-3"))
    assert fail["error_code"] == "E_EXIT"
    assert fail["retryable"] is False
    assert "boom" in fail["logs_tail"]
    assert "code 3" in fail["error_msg"]


def test_missing_artifact_is_e_output(mock, miner):
    mock.admin.enqueue(
        cli_job("no-art", "sh", ["-c", "true"], artifacts=[{"path": "out.bin"}]), retry=False
    )
    assert last_fail(wait_final(mock, "no-art"))["error_code"] == "E_OUTPUT"


def test_artifact_symlink_to_outside_is_e_output(mock, miner):
    mock.admin.enqueue(
        cli_job(
            "link-art", "sh", ["-c", "ln -s /etc/passwd out.txt"], artifacts=[{"path": "out.txt"}]
        ),
        retry=False,
    )
    assert last_fail(wait_final(mock, "link-art"))["error_code"] == "E_OUTPUT"


def test_gpu_job_is_not_pulled_by_a_cpu_only_node(mock, miner):
    mock.admin.enqueue(
        cli_job("gpu-1", "sh", ["-c", "true"], requirements={"gpu": True, "vram_mb": 1000}),
        retry=False,
    )
    mock.admin.enqueue(cli_job("cpu-after-gpu", "sh", ["-c", "true"]), retry=False)
    assert wait_final(mock, "cpu-after-gpu")["state"] == "succeeded"
    assert mock.admin.job("gpu-1")["state"] == "queued"
    pulls = [c for c in mock.admin.node("node-test")["calls"] if c["endpoint"] == "jobs/pull"]
    assert pulls, "the miner never pulled"
