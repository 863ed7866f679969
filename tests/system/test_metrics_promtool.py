"""/metrics of a real miner (against the real mock, on the host) passes `promtool check metrics`.

Needs no root and no container: only promtool (fetched from Debian's
prometheus package when missing; the test skips, loudly, when it can't be had).
"""

from __future__ import annotations

import os

import httpx
import pytest

from tests.support.wait import wait_for
from tests.system.promtool import check_metrics, find_promtool

pytestmark = pytest.mark.system

# The metric set (gpu_* appear as families even on a node without GPUs).
FAMILIES = (
    "aitbc_miner_build_info",
    "aitbc_miner_jobs_total",
    "aitbc_miner_jobs_running",
    "aitbc_miner_jobs_queued",
    "aitbc_miner_job_duration_seconds",
    "aitbc_miner_heartbeats_total",
    "aitbc_miner_heartbeat_last_success_timestamp_seconds",
    "aitbc_miner_coordinator_requests_total",
    "aitbc_miner_upload_bytes_total",
    "aitbc_miner_slots",
    "aitbc_miner_slots_in_use",
    "aitbc_miner_recovered_jobs",
    "aitbc_miner_gpu_memory_free_bytes",
    "aitbc_miner_gpu_memory_used_bytes",
    "aitbc_miner_gpu_utilization_ratio",
    "process_resident_memory_bytes",
    "process_open_fds",
)


@pytest.fixture(scope="module")
def promtool():
    path, why = find_promtool()
    if path is None:
        message = f"PROMTOOL UNAVAILABLE, /metrics lint NOT checked: {why}"
        if os.environ.get("AITBC_SYSTEM_TEST") == "require":
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_final(mock, job_id: str, timeout: float = 30.0) -> dict:
    final = ("succeeded", "failed", "cancelled", "expired")
    return wait_for(
        lambda: (j := mock.admin.job(job_id))["state"] in final and j,
        timeout=timeout, what=f"job {job_id} final",
    )  # fmt: skip


def families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_metrics_of_a_working_miner_pass_promtool(promtool, mock, miner):
    job = {"job_id": "prom-1", "runner": "cli", "timeout_s": 30, "command": "echo", "args": ["hi"]}
    mock.admin.enqueue(job, retry=False)
    assert wait_final(mock, "prom-1")["state"] == "succeeded"
    response = httpx.get(f"{miner.health_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    checked = check_metrics(promtool, response.content)
    assert checked.returncode == 0, f"promtool: {checked.stdout}{checked.stderr}"
    text = response.text
    exposed = {name.removesuffix("_total") for name in families(text)}
    missing = [f for f in FAMILIES if f.removesuffix("_total") not in exposed]
    assert not missing, f"metric families missing from /metrics: {missing}"
    assert 'aitbc_miner_jobs_total{code="",outcome="done",runner="cli"} 1.0' in text
    assert 'aitbc_miner_heartbeats_total{result="ok"}' in text


def test_promtool_catches_a_broken_exposition(promtool):
    # the lint is real: a counter without _total and a missing HELP are reported
    bad = b"# TYPE aitbc_miner_things counter\naitbc_miner_things 1\n"
    assert check_metrics(promtool, bad).returncode != 0
