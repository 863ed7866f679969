"""Signed manifests end to end: a real miner against the real mock coordinator.

Unsigned and tampered jobs are covered in tests/integration/test_jobs_e2e.py; here:
a bad signature, a stranger's key, an unpinned HMAC key, HMAC-SHA256 with the secret
pinned through `env:`, key rotation across a coordinator key change, and the signed
`node_id` / `not_after` binding. A refused job must never get a workspace, let alone
run: every job here would leave a `ran-<job_id>` marker if it ever executed.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.security._e2e import last_fail, marker_job, markers, wait_final
from tests.support.mockproc import start_mock


def refused(mock, miner, job_id: str, reason: str) -> None:
    """The job ended E_SIGNATURE (not retryable) with `reason`, and never ran here."""
    job = wait_final(mock, job_id)
    fail = last_fail(job)
    assert fail["error_code"] == "E_SIGNATURE", fail
    assert fail["retryable"] is False
    assert reason in fail["error_msg"], fail["error_msg"]
    assert job["result"] is None
    assert not (miner.workspace / job_id).exists(), "a refused job got a workspace"
    finished = miner.wait_event("job_finished", job_id=job_id)
    assert finished["error_code"] == "E_SIGNATURE"


def test_bad_signature_unknown_key_and_unpinned_hmac_are_refused(tmp_path, miner_factory):
    mock = start_mock(tmp_path / "mock", "--hmac-secret", "not-pinned-by-the-miner")
    try:
        miner = miner_factory(mock)
        mock.admin.enqueue(marker_job("s-bad"), sign="bad", retry=False)
        mock.admin.enqueue(marker_job("s-stranger"), sign="unknown-key", retry=False)
        mock.admin.enqueue(marker_job("s-hmac"), sign="hmac", retry=False)
        mock.admin.enqueue(marker_job("s-good"), retry=False)
        refused(mock, miner, "s-bad", "ed25519 signature does not match")
        refused(mock, miner, "s-stranger", "unknown ed25519 key_id 'mock-unknown'")
        refused(mock, miner, "s-hmac", "unknown hmac key_id 'mock-hmac'")
        # The same job, properly signed, does run: the refusals above were the signatures.
        assert wait_final(mock, "s-good")["state"] == "succeeded"
        assert [p.name for p in markers(miner.workspace)] == ["ran-s-good"]
        assert miner.proc.poll() is None
    finally:
        mock.stop()


def test_hmac_sha256_end_to_end_with_secret_from_env(tmp_path, miner_factory):
    secret = "hmac-shared-Secret-Ünïcode-42"
    mock = start_mock(tmp_path / "mock", "--hmac-secret", secret)
    try:
        assert mock.hmac_key_id == "mock-hmac"
        keys = json.dumps({"mock-hmac": "env:MOCK_HMAC_SECRET"})
        good = miner_factory(mock, AITBC_MINER_SECURITY__HMAC_KEYS=keys, MOCK_HMAC_SECRET=secret)
        mock.admin.enqueue(marker_job("h-1", artifacts=[{"path": "ran-h-1"}]), sign="hmac",
                           retry=False)  # fmt: skip
        job = wait_final(mock, "h-1")
        assert job["state"] == "succeeded", job
        assert job["attempts"][-1]["sign"] == "hmac"
        assert good.stop() == 0

        wrong = miner_factory(
            mock,
            node_id="node-wrong-secret",
            AITBC_MINER_SECURITY__HMAC_KEYS=keys,
            MOCK_HMAC_SECRET=secret + "x",
        )
        mock.admin.enqueue(marker_job("h-2"), sign="hmac", retry=False)
        refused(mock, wrong, "h-2", "hmac-sha256 signature does not match")
        assert not list(wrong.workspace.rglob("ran-h-2"))
    finally:
        mock.stop()


def _key_file(path: Path) -> tuple[Path, str]:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return path, base64.b64encode(raw).decode()


def test_key_rotation_old_and_new_key_pinned_then_old_retired(tmp_path, miner_factory):
    old_file, old_pub = _key_file(tmp_path / "old.pem")
    new_file, new_pub = _key_file(tmp_path / "new.pem")

    def coordinator(key_id: str, key_file: Path, port: int = 0):
        return start_mock(
            tmp_path / f"mock-{key_id}",
            "--key-id", key_id, "--signing-key-file", str(key_file),
            port=port,
        )  # fmt: skip

    both = json.dumps({"k-2025": old_pub, "k-2026": new_pub})
    mock = coordinator("k-2025", old_file)
    port = mock.port
    try:
        miner = miner_factory(mock, AITBC_MINER_SECURITY__MANIFEST_KEYS=both)
        mock.admin.enqueue(marker_job("rot-old"), retry=False)
        assert wait_final(mock, "rot-old")["state"] == "succeeded"

        # The coordinator rotates to the new key; the running miner accepts it at once.
        mock.stop()
        mock = coordinator("k-2026", new_file, port)
        mock.admin.enqueue(marker_job("rot-new"), retry=False)
        assert wait_final(mock, "rot-new")["state"] == "succeeded"
        assert miner.stop() == 0

        # The operator retires the old key: a job still signed with it is refused.
        mock.stop()
        mock = coordinator("k-2025", old_file, port)
        retired = miner_factory(
            mock, node_id="node-retired", AITBC_MINER_SECURITY__MANIFEST_KEYS=json.dumps(
                {"k-2026": new_pub})
        )  # fmt: skip
        mock.admin.enqueue(marker_job("rot-stale"), retry=False)
        refused(mock, retired, "rot-stale", "unknown ed25519 key_id 'k-2025'")
        assert sorted(p.name for p in markers(miner.workspace)) == ["ran-rot-new", "ran-rot-old"]
    finally:
        mock.stop()


def test_signed_node_id_and_not_after_bind_a_job(mock, miner):
    now = datetime.now(UTC)
    past = (now - timedelta(seconds=5)).isoformat().replace("+00:00", "Z")
    future = (now + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    mock.admin.enqueue(marker_job("b-elsewhere", node_id="node-someone-else"), retry=False)
    mock.admin.enqueue(marker_job("b-expired", not_after=past), retry=False)
    mock.admin.enqueue(marker_job("b-garbage", not_after="tomorrow-ish"), retry=False)
    mock.admin.enqueue(marker_job("b-mine", node_id=miner.node_id, not_after=future), retry=False)
    refused(mock, miner, "b-elsewhere", "addressed to another node")
    refused(mock, miner, "b-expired", "expired")
    refused(mock, miner, "b-garbage", "not_after")
    job = wait_final(mock, "b-mine")
    assert job["state"] == "succeeded", job
    # The binding fields were part of what the coordinator signed and sent.
    assert job["manifest"]["node_id"] == miner.node_id
    assert [p.name for p in markers(miner.workspace)] == ["ran-b-mine"]
