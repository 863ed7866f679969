"""The bundled mock coordinator, as a real process on loopback, enforces PROTOCOL.md:
auth, idempotency, leases, signatures, results, chunked uploads, faults, persistence."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tests.support.mockproc import MockCoordinator, start_mock
from tests.support.wait import wait_for

BOOTSTRAP = "dev-bootstrap-token"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cli_job(job_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "runner": "cli",
        "timeout_s": 60,
        "command": "echo",
        "args": ["hi"],
        "artifacts": [{"path": "out.txt"}],
        **extra,
    }


class Miner:
    """A minimal, hand-driven protocol client."""

    def __init__(self, mock: MockCoordinator, node_id: str = "node-1") -> None:
        self.mock = mock
        self.node_id = node_id
        self.http = httpx.Client(base_url=mock.url, timeout=30)
        self.token: str | None = None

    def close(self) -> None:
        self.http.close()

    def headers(self, key: str | None, token: str | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        if key != "":
            headers["Idempotency-Key"] = key or str(uuid.uuid4())
        return headers

    def post(
        self, path: str, body: Any, *, key: str | None = None, token: str | None = None
    ) -> httpx.Response:
        """POST JSON; key=None -> fresh Idempotency-Key, key="" -> none at all."""
        return self.http.post(path, json=body, headers=self.headers(key, token))

    def register(self, *, token: str = BOOTSTRAP, key: str | None = None) -> httpx.Response:
        body = {
            "node_id": self.node_id,
            "version": "0.1.0",
            "runners": ["cli", "python"],
            "slots": {"cpu": 2, "gpu": 0},
            "tags": ["cpu"],
        }
        response = self.post("/nodes/register", body, key=key, token=token)
        if response.status_code == 200:
            self.token = response.json()["node_token"]
        return response

    def heartbeat(self, running: list[str] | None = None, **kw: Any) -> httpx.Response:
        body = {
            "node_id": self.node_id,
            "seq": 1,
            "state": "active",
            "load": {"cpu_pct": 1.0, "load1": 0.1},
            "running_jobs": running or [],
        }
        return self.post("/nodes/heartbeat", body, **kw)

    def pull(self, wait_s: float = 0, key: str | None = None, **filters: Any) -> httpx.Response:
        body = {
            "node_id": self.node_id,
            "filters": {
                "runners": ["cli", "python"],
                "gpu_slots_free": 0,
                "cpu_slots_free": 2,
                **filters,
            },
            "wait_s": wait_s,
        }
        return self.post("/jobs/pull", body, key=key)

    def take(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Pull and ack one job; return (job, lease)."""
        answer = self.pull().json()
        assert answer["job"] is not None, answer
        job, lease = answer["job"], answer["lease"]
        ack = self.ack(job, lease)
        assert ack.status_code == 200, ack.text
        return job, lease

    def ack(self, job: dict[str, Any], lease: dict[str, Any], **kw: Any) -> httpx.Response:
        return self.post(
            "/jobs/ack",
            {
                "job_id": job["job_id"],
                "node_id": self.node_id,
                "lease_id": lease["lease_id"],
                "attempt": job["attempt"],
            },
            **kw,
        )

    def fail(self, job_id: str, attempt: int, code: str, retryable: bool) -> httpx.Response:
        return self.post(
            "/jobs/fail",
            {
                "job_id": job_id,
                "node_id": self.node_id,
                "attempt": attempt,
                "error_code": code,
                "error_msg": "boom",
                "retryable": retryable,
                "logs_ref": None,
                "logs_tail": "last lines",
            },
        )

    def result(
        self,
        job_id: str,
        attempt: int,
        files: dict[str, bytes],
        *,
        key: str | None = None,
        declared: dict[str, Any] | None = None,
        uploads: dict[str, tuple[str, bytes]] | None = None,
    ) -> httpx.Response:
        """Multipart result; `declared` overrides metadata artifact fields per path."""
        artifacts = [
            {
                "path": p,
                "type": "text/plain",
                "size": len(b),
                "sha256": sha(b),
                "upload_id": None,
                **(declared or {}).get(p, {}),
            }
            for p, b in files.items()
        ]
        for path, (upload_id, data) in (uploads or {}).items():
            artifacts.append(
                {
                    "path": path,
                    "type": "application/octet-stream",
                    "size": len(data),
                    "sha256": sha(data),
                    "upload_id": upload_id,
                }
            )
        meta = {
            "job_id": job_id,
            "node_id": self.node_id,
            "attempt": attempt,
            "exit_code": 0,
            "started_at": "2025-01-01T00:00:00Z",
            "finished_at": "2025-01-01T00:00:02Z",
            "duration_s": 2.0,
            "usage": {"cpu_s": 1.5, "max_rss_mb": 10, "gpu": []},
            "artifacts": artifacts,
        }
        parts: list[Any] = [("metadata", (None, json.dumps(meta), "application/json"))]
        parts += [("artifact", (p, b, "application/octet-stream")) for p, b in files.items()]
        return self.http.post("/jobs/result", files=parts, headers=self.headers(key, None))


@pytest.fixture
def mock(tmp_path: Path):
    coordinator = start_mock(tmp_path)
    yield coordinator
    assert coordinator.stop() == 0, coordinator.logs()
    assert "Traceback" not in coordinator.logs()


@pytest.fixture
def miner(mock: MockCoordinator):
    client = Miner(mock)
    assert client.register().status_code == 200
    yield client
    client.close()


def test_ready_line_auth_and_request_validation(mock: MockCoordinator) -> None:
    line = json.loads(mock.stdout_path.read_text().strip())
    assert line == mock.ready and line["event"] == "mock_ready" and line["pid"] == mock.pid
    assert len(base64.b64decode(mock.public_key)) == 32
    m = Miner(mock)
    assert m.register(token="wrong").status_code == 401
    assert m.http.post("/jobs/pull", json={}, headers={"Idempotency-Key": "k"}).status_code == 401
    assert m.post("/jobs/pull", {}, token="nt-unknown").status_code == 401
    first = m.register()
    assert first.status_code == 200 and first.json()["status"] == "active"
    assert first.json()["expires_at"].endswith("Z")
    assert m.pull(key="").status_code == 400  # no Idempotency-Key
    bad_json = m.http.post(
        "/jobs/pull",
        content=b"{nope",
        headers={**m.headers(None, None), "Content-Type": "application/json"},
    )
    assert bad_json.status_code == 400 and "error" in bad_json.json()
    wrong_type = m.post("/jobs/pull", {"node_id": m.node_id, "wait_s": "soon"})
    assert wrong_type.status_code == 422 and "wait_s" in wrong_type.json()["error"]
    assert m.heartbeat().json() == {"status": "active", "cancel": []}
    assert m.register().json()["node_token"] != first.json()["node_token"]
    node = mock.admin.node(m.node_id)
    assert node["registrations"] == 2 and node["violations"] == 0
    assert node["heartbeats"][0]["body"]["seq"] == 1
    m.close()


def test_replay_returns_first_answer_and_key_reuse_is_422(mock, miner) -> None:
    ids = mock.admin.enqueue_many([cli_job("j-a"), cli_job("j-b")])
    first = miner.pull(key="pull-key-1")
    again = miner.pull(key="pull-key-1")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and first.json()["job"]["job_id"] == "j-a"
    assert mock.admin.job(ids[1])["state"] == "queued"  # no second hand-out
    reused = miner.pull(key="pull-key-1", cpu_slots_free=1)
    assert reused.status_code == 422
    assert reused.json() == {"error": "idempotency key reused with a different request"}
    calls = [c for c in mock.admin.node(miner.node_id)["calls"] if c["endpoint"] == "jobs/pull"]
    assert [c["replayed"] for c in calls] == [False, True, False]
    assert mock.admin.job("j-a")["history"][0]["attempt"] == 1


def test_invalid_manifests_are_handed_out_as_given(mock, miner) -> None:
    mock.admin.enqueue({"job_id": "bad/id", "runner": "cli"}, retry=False)
    mock.admin.enqueue({"job_id": 7, "runner": 3}, raw=True)
    assert miner.pull().json()["job"] == {"job_id": "bad/id", "runner": "cli", "attempt": 1}
    assert miner.pull().json()["job"] == {"job_id": 7, "runner": 3}
    assert miner.fail("bad/id", 1, "E_INVALID", False).json()["state"] == "failed"
    assert miner.fail("7", 1, "E_INVALID", False).status_code == 200
    assert mock.admin.job("bad/id")["fails"][0]["error_code"] == "E_INVALID"
    assert mock.admin.job("7")["state"] == "failed"


def test_pending_node_pull_is_403_and_counted(mock: MockCoordinator) -> None:
    mock.admin.set_node_status("node-p", "pending")
    m = Miner(mock, "node-p")
    assert m.register().json()["status"] == "pending"
    denied = m.pull()
    assert denied.status_code == 403 and denied.json() == {"error": "node pending"}
    assert mock.admin.node("node-p")["violations"] == 1
    assert m.heartbeat().json()["status"] == "pending"
    mock.admin.set_node_status("node-p", "disabled")
    assert m.heartbeat().json()["status"] == "disabled"
    assert m.pull().status_code == 403
    mock.admin.set_node_status("node-p", "active")
    assert m.pull().status_code == 200
    mock.admin.set_node_status("node-p", "banned")
    assert m.heartbeat().status_code == 403 and m.register().status_code == 403
    assert mock.admin.node("node-p")["violations"] == 1
    m.close()


def test_long_poll_wakes_when_a_job_is_enqueued(mock, miner) -> None:
    started = time.monotonic()
    assert miner.pull(wait_s=0.3).json() == {"job": None, "lease": None, "signature": None}
    assert time.monotonic() - started >= 0.25
    box: dict[str, Any] = {}

    def long_poll() -> None:
        box["response"] = miner.pull(wait_s=20)
        box["at"] = time.monotonic()

    thread = threading.Thread(target=long_poll)
    thread.start()
    wait_for(lambda: mock.admin.stats()["waiting_pulls"] == 1, what="pull to be waiting")
    enqueued = time.monotonic()
    mock.admin.enqueue(cli_job("j-wake"))
    thread.join(10)
    assert box["response"].json()["job"]["job_id"] == "j-wake"
    assert box["at"] - enqueued < 5


def test_lease_expiry_requeues_with_next_attempt(mock, miner) -> None:
    job_id = mock.admin.enqueue(cli_job("j-lease"), lease_s=0.5)
    first = miner.pull().json()
    assert first["job"]["attempt"] == 1
    wait_for(lambda: mock.admin.job(job_id)["state"] == "queued", what="lease expiry")
    record = mock.admin.job(job_id)
    assert record["attempt"] == 2 and record["attempts"][0]["outcome"] == "lease_expired"
    assert miner.ack(first["job"], first["lease"]).status_code == 409
    second = miner.pull().json()
    assert second["job"]["attempt"] == 2 and second["lease"] != first["lease"]
    assert miner.heartbeat(running=["j-lease"]).status_code == 200
    assert miner.result("j-lease", 1, {"out.txt": b"x"}).status_code == 409  # stale attempt
    assert set(mock.admin.job(job_id)["handed_out_at"]) == {"1", "2"}


def test_signatures_verify_with_the_announced_key(tmp_path: Path) -> None:
    mock = start_mock(tmp_path, "--hmac-secret", "s3cret")
    try:
        miner = Miner(mock)
        miner.register()
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(mock.public_key))
        modes = ["ed25519", "bad", "tamper", "unknown-key", "none", "hmac"]
        for mode in modes:
            mock.admin.enqueue(cli_job(f"j-{mode}", env={"LANG": "C.UTF-8"}, note="é"), sign=mode)
        got = {}
        for mode in modes:
            answer = miner.pull().json()
            got[mode] = (answer["job"], answer["signature"])
        job, sig = got["ed25519"]
        assert sig["key_id"] == mock.key_id and sig["alg"] == "ed25519"
        public.verify(base64.b64decode(sig["value"]), canonical(job))
        for mode in ("bad", "tamper"):
            job, sig = got[mode]
            with pytest.raises(InvalidSignature):
                public.verify(base64.b64decode(sig["value"]), canonical(job))
        assert got["unknown-key"][1]["key_id"] == "mock-unknown"
        assert got["none"][1] is None
        job, sig = got["hmac"]
        assert sig["key_id"] == mock.hmac_key_id == "mock-hmac" and sig["alg"] == "hmac-sha256"
        import hmac as hmac_mod

        digest = hmac_mod.new(b"s3cret", canonical(job), hashlib.sha256).digest()
        assert base64.b64decode(sig["value"]) == digest
        miner.close()
    finally:
        assert mock.stop() == 0


def test_result_checks_stores_and_deduplicates(mock, miner) -> None:
    job_id = mock.admin.enqueue(cli_job("j-res"))
    miner.take()
    wrong = miner.result(
        "j-res", 1, {"out.txt": b"hello"}, declared={"out.txt": {"sha256": "0" * 64}}
    )
    assert wrong.status_code == 422 and "sha256" in wrong.json()["error"]
    short = miner.result("j-res", 1, {"out.txt": b"hello"}, declared={"out.txt": {"size": 3}})
    assert short.status_code == 422
    escape = miner.result("j-res", 1, {"../out.txt": b"hello"})
    assert escape.status_code == 422
    good = miner.result("j-res", 1, {"out.txt": b"hello", "sub/b.bin": b"\x00\x01"}, key="res-1")
    assert good.status_code == 200 and good.json()["accepted"] is True
    again = miner.result("j-res", 1, {"out.txt": b"hello", "sub/b.bin": b"\x00\x01"}, key="res-1")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    other = miner.result("j-res", 1, {"out.txt": b"other"})
    assert other.status_code == 409
    record = mock.admin.job(job_id)
    assert record["state"] == "succeeded" and record["results_accepted"] == 1
    assert {a["path"]: a["sha256"] for a in record["artifacts"]} == {
        "out.txt": sha(b"hello"),
        "sub/b.bin": sha(b"\x00\x01"),
    }
    assert mock.admin.artifact(job_id, "out.txt") == b"hello"
    assert mock.admin.artifact(job_id, "sub/b.bin") == b"\x00\x01"
    assert mock.admin.node(miner.node_id)["violations"] == 0


def test_chunked_upload_resumes(mock, miner) -> None:
    job_id = mock.admin.enqueue(cli_job("j-up", artifacts=[{"path": "big.bin"}]), chunk_size=1024)
    miner.take()
    data = bytes(range(256)) * 11 + b"tail"  # 2820 bytes
    start = {
        "node_id": miner.node_id,
        "attempt": 1,
        "path": "big.bin",
        "size": len(data),
        "sha256": sha(data),
    }
    created = miner.post(f"/jobs/{job_id}/uploads", start).json()
    assert created["chunk_size"] == 1024 and created["received"] == 0
    upload_id = created["upload_id"]

    def put(first: int, last: int, body: bytes, key: str | None = None) -> httpx.Response:
        headers = {**miner.headers(key, None), "Content-Range": f"bytes {first}-{last}/{len(data)}"}
        return miner.http.put(f"/uploads/{upload_id}", content=body, headers=headers)

    assert put(0, 1023, data[:1024]).json() == {"received": 1024}
    skipped = put(2048, 2819, data[2048:])
    assert skipped.status_code == 416 and skipped.json()["received"] == 1024
    bad_range = miner.http.put(
        f"/uploads/{upload_id}",
        content=b"x",
        headers={**miner.headers(None, None), "Content-Range": "bytes=0-0"},
    )
    assert bad_range.status_code == 400
    status = miner.http.get(f"/uploads/{upload_id}", headers=miner.headers("", None))
    assert status.json() == {"received": 1024, "size": len(data), "complete": False}
    resumed = miner.post(f"/jobs/{job_id}/uploads", start).json()
    assert resumed == {"upload_id": upload_id, "chunk_size": 1024, "received": 1024}
    assert put(1024, 2047, data[1024:2048], key="chunk-2").json() == {"received": 2048}
    assert put(1024, 2047, data[1024:2048], key="chunk-2").json() == {"received": 2048}
    assert put(2048, 2819, data[2048:]).json() == {"received": len(data)}
    counters = mock.admin.upload(upload_id)
    assert counters["complete"] and counters["puts"] == 6
    assert counters["bytes_put_total"] == 1024 + 772 + 1 + 1024 * 2 + 772
    ok = miner.result(job_id, 1, {}, uploads={"big.bin": (upload_id, data)})
    assert ok.status_code == 200, ok.text
    assert mock.admin.artifact(job_id, "big.bin") == data


def test_faults_error_and_dropped_connections(mock, miner) -> None:
    mock.admin.fault(endpoint="nodes/heartbeat", error_rate=1.0, status=503, retry_after=2, times=1)
    failed = miner.heartbeat()
    assert failed.status_code == 503 and failed.headers["Retry-After"] == "2"
    assert miner.heartbeat().status_code == 200
    mock.admin.fault(endpoint="*", drop_rate=1.0)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        miner.heartbeat()
    assert mock.admin.stats()["faults"] == {"error": 1, "drop": 1}  # /admin is never faulted
    mock.admin.clear_faults()
    assert miner.heartbeat().status_code == 200


def test_drop_after_processing_then_replay(mock, miner) -> None:
    job_id = mock.admin.enqueue(cli_job("j-drop"))
    mock.admin.fault(endpoint="jobs/pull", drop_rate=1.0, drop_after=True, times=1)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        miner.pull(key="pull-drop")
    record = mock.admin.job(job_id)
    assert record["state"] == "leased" and record["holder"] == miner.node_id
    replay = miner.pull(key="pull-drop").json()
    assert replay["job"]["job_id"] == "j-drop"
    assert replay["lease"]["lease_id"] == record["lease"]["lease_id"]
    assert len(mock.admin.job(job_id)["attempts"]) == 1


def test_fail_requeues_and_admin_cancel(mock, miner) -> None:
    job_id = mock.admin.enqueue(cli_job("j-fail"))
    job, _ = miner.take()
    assert miner.fail("j-fail", 1, "E_BOGUS", True).status_code == 422
    assert miner.fail("j-fail", 1, "E_NOGPU", True).json()["state"] == "queued"
    job, _ = miner.take()
    assert job["attempt"] == 2
    mock.admin.cancel(job_id)
    assert miner.heartbeat(running=["j-fail"]).json()["cancel"] == ["j-fail"]
    progress = miner.post(
        "/jobs/progress",
        {"job_id": "j-fail", "node_id": miner.node_id, "attempt": 2, "pct": 50, "note": "half"},
    )
    assert progress.json() == {"cancel": True}
    assert miner.fail("j-fail", 2, "E_CANCELLED", False).status_code == 200
    record = mock.admin.job(job_id)
    assert record["state"] == "cancelled" and [f["error_code"] for f in record["fails"]] == [
        "E_NOGPU",
        "E_CANCELLED",
    ]


def test_files_count_downloads_and_fail_first(mock: MockCoordinator) -> None:
    info = mock.admin.add_file("in/data.txt", b"payload", fail_times=1)
    assert info["sha256"] == sha(b"payload") and info["size"] == 7
    assert httpx.get(info["url"]).status_code == 503
    got = httpx.get(info["url"])
    assert got.status_code == 200 and got.content == b"payload"
    assert mock.admin.stats()["downloads"]["in/data.txt"]["downloads"] == 1


def test_revoked_token_is_401(mock, miner) -> None:
    assert miner.heartbeat().status_code == 200
    mock.admin.revoke(miner.node_id)
    assert miner.heartbeat().status_code == 401
    assert miner.register().status_code == 200
    assert miner.heartbeat().status_code == 200


def test_state_file_survives_a_restart(tmp_path: Path) -> None:
    args = ("--state-file", str(tmp_path / "state.json"))
    first = start_mock(tmp_path, *args)
    miner = Miner(first)
    miner.register()
    job_id = first.admin.enqueue(cli_job("j-keep"))
    first.admin.enqueue(cli_job("j-later"))
    miner.take()
    assert miner.result("j-keep", 1, {"out.txt": b"kept"}, key="res-keep").status_code == 200
    assert first.stop() == 0
    miner.close()

    second = start_mock(tmp_path, *args, port=first.port)
    try:
        assert second.public_key == first.public_key and second.url == first.url
        again = Miner(second)
        again.token = miner.token
        assert again.heartbeat().status_code == 200  # the token survived
        replay = again.result("j-keep", 1, {"out.txt": b"kept"}, key="res-keep")
        assert replay.json()["duplicate"] is True
        assert second.admin.job(job_id)["results_accepted"] == 1
        assert second.admin.artifact(job_id, "out.txt") == b"kept"
        assert again.pull().json()["job"]["job_id"] == "j-later"
        assert second.admin.node("node-1")["registrations"] == 1
        again.close()
    finally:
        assert second.stop() == 0
