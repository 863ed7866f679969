"""Node lifecycle against the real mock: registration, auth, status, cadence, shutdown."""

from __future__ import annotations

import itertools
import socket
import time

from tests.support.mockproc import start_mock
from tests.support.wait import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def heartbeats(mock, node_id: str = "node-test") -> list[dict]:
    return mock.admin.node(node_id)["heartbeats"]


def test_coordinator_down_at_start_then_registers(tmp_path, miner_factory):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1"

    class Pending:  # the mock is not up yet; the miner only needs its URL and key
        pass

    # Start the mock first only to learn its key, then stop it: the key file keeps it stable.
    key_file = tmp_path / "signing.key"
    first = start_mock(tmp_path / "m0", "--signing-key-file", str(key_file), port=port)
    first.stop()
    placeholder = Pending()
    placeholder.url, placeholder.key_id, placeholder.public_key = (
        url,
        first.key_id,
        first.public_key,
    )
    miner = miner_factory(placeholder, wait_registered=False)
    miner.wait_event("coordinator_retry", endpoint="nodes/register")
    assert not miner.find("registered")
    mock = start_mock(tmp_path / "m1", "--signing-key-file", str(key_file), port=port)
    try:
        miner.wait_event("registered", timeout=20)
        mock.admin.enqueue(
            {
                "job_id": "late-1",
                "runner": "cli",
                "timeout_s": 10,
                "command": "sh",
                "args": ["-c", "true"],
            },
            retry=False,
        )
        wait_for(lambda: mock.admin.job("late-1")["state"] == "succeeded", timeout=20)
    finally:
        miner.stop()
        mock.stop()


def test_revoked_token_leads_to_reregistration(mock, miner):
    wait_for(lambda: len(heartbeats(mock)) >= 1, what="first heartbeat")
    assert mock.admin.node("node-test")["registrations"] == 1
    mock.admin.revoke("node-test")
    wait_for(
        lambda: mock.admin.node("node-test")["registrations"] == 2, timeout=15, what="re-register"
    )
    before = len(heartbeats(mock))
    wait_for(
        lambda: len(heartbeats(mock)) > before, timeout=10, what="heartbeat with the new token"
    )
    mock.admin.enqueue(
        {
            "job_id": "after-revoke",
            "runner": "cli",
            "timeout_s": 10,
            "command": "sh",
            "args": ["-c", "true"],
        },
        retry=False,
    )
    wait_for(lambda: mock.admin.job("after-revoke")["state"] == "succeeded", timeout=20)


def test_pending_node_pulls_nothing_until_active(tmp_path, miner_factory):
    mock = start_mock(tmp_path / "mock", "--pending-by-default")
    try:
        miner = miner_factory(mock)
        mock.admin.enqueue(
            {
                "job_id": "wait-1",
                "runner": "cli",
                "timeout_s": 10,
                "command": "sh",
                "args": ["-c", "true"],
            },
            retry=False,
        )
        wait_for(lambda: len(heartbeats(mock)) >= 3, timeout=15, what="heartbeats while pending")
        node = mock.admin.node("node-test")
        assert node["violations"] == 0
        assert not [c for c in node["calls"] if c["endpoint"] == "jobs/pull"]
        assert mock.admin.job("wait-1")["state"] == "queued"
        mock.admin.set_node_status("node-test", "active")
        wait_for(lambda: mock.admin.job("wait-1")["state"] == "succeeded", timeout=20)
        assert mock.admin.node("node-test")["violations"] == 0
        miner.stop()
    finally:
        mock.stop()


def test_heartbeat_cadence_within_jitter_bounds(mock, miner_factory):
    miner_factory(
        mock, AITBC_MINER_HEARTBEAT__INTERVAL_S="1.5", AITBC_MINER_HEARTBEAT__JITTER_PCT="20"
    )
    wait_for(lambda: len(heartbeats(mock)) >= 7, timeout=30, what="7 heartbeats")
    beats = heartbeats(mock)[:7]
    times = [b["ts"] for b in beats]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 1.5 s ± 20 % = [1.2, 1.8]; small scheduling slack below, generous above.
    assert all(1.15 <= g <= 2.8 for g in gaps), gaps
    assert max(gaps) - min(gaps) > 0.01, f"no jitter at all: {gaps}"
    seqs = [b["body"]["seq"] for b in beats]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    body = beats[-1]["body"]
    for key in ("node_id", "state", "load", "free_mb", "disk_free_mb", "gpu_free", "running_jobs"):
        assert key in body, key
    assert body["state"] == "active"


def test_sigterm_idle_miner_deregisters_and_exits_0(mock, miner):
    wait_for(lambda: len(heartbeats(mock)) >= 1, what="first heartbeat")
    miner.wait_event("node_status", new="active")
    start = time.monotonic()
    miner.signal()
    code = miner.proc.wait(timeout=10)
    elapsed = time.monotonic() - start
    assert code == 0, miner.tail()
    assert elapsed < 2.0, f"took {elapsed:.2f}s to stop"
    assert mock.admin.node("node-test")["deregistered"] is True


def test_healthz_readyz_metrics(mock, miner):
    import httpx

    base = miner.health_url
    wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200, timeout=15, what="ready")
    health = httpx.get(f"{base}/healthz").json()
    assert health["node_id"] == "node-test" and health["registered"] is True
    metrics = httpx.get(f"{base}/metrics").text
    assert "aitbc_miner_build_info" in metrics
    assert 'aitbc_miner_heartbeats_total{result="ok"}' in metrics
