"""Chunked resumable upload against a recording fake coordinator (httpx.MockTransport)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re

import httpx

from aitbc_miner.coordinator import CoordinatorClient
from aitbc_miner.journal import ArtifactRecord, JobState
from aitbc_miner.lifecycle import Phase
from aitbc_miner.upload import deliver_result, upload_chunked

RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


class FakeUploads:
    """Coordinator side of the chunked upload, with scripted hiccups."""

    def __init__(
        self, data: bytes, *, already: int = 0, chunk: int = 1000, fail_puts: set[int] = frozenset()
    ):
        self.data, self.received, self.chunk = data, already, chunk
        self.puts: list[tuple[int, int]] = []
        self.fail_puts = set(fail_puts)  # indexes of PUTs answered 503
        self.results: list[dict] = []
        self.jump_on_first_put: int | None = None  # the coordinator had more than it said

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/nodes/register"):
            return httpx.Response(200, json={"node_token": "tok", "status": "active"})
        if path.endswith("/uploads") and request.method == "POST":
            return httpx.Response(
                200, json={"upload_id": "up-1", "chunk_size": self.chunk, "received": self.received}
            )
        if "/uploads/" in path and request.method == "PUT":
            index = len(self.puts)
            if index == 0 and self.jump_on_first_put is not None:
                self.received = self.jump_on_first_put
            first, last, size = map(int, RANGE.fullmatch(request.headers["Content-Range"]).groups())
            body = request.read()
            self.puts.append((first, len(body)))
            if index in self.fail_puts:
                return httpx.Response(503)
            if first != self.received:
                return httpx.Response(416, json={"received": self.received})
            assert body == self.data[first : last + 1] and size == len(self.data)
            self.received += len(body)
            return httpx.Response(200, json={"received": self.received})
        if path.endswith("/jobs/result"):
            self.results.append({"headers": dict(request.headers), "body": request.read()})
            return httpx.Response(200, json={"accepted": True})
        return httpx.Response(404)


async def client_for(fake: FakeUploads) -> CoordinatorClient:
    client = CoordinatorClient(
        base_url="http://coord.test/api/v1",
        bootstrap_token="boot",
        node_id="n1",
        transport=httpx.MockTransport(fake),
        backoff_min_s=0.01,
        backoff_max_s=0.02,
        rng=random.Random(0),
    )
    await client.register()
    return client


def artifact(tmp_path, data: bytes) -> tuple[int, ArtifactRecord]:
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY), ArtifactRecord(
        "big.bin", "application/octet-stream", len(data), hashlib.sha256(data).hexdigest()
    )


STATE = JobState(job_id="j1", attempt=2, phase=Phase.UPLOADING, final_key="final-key")


async def test_resumes_from_received_and_sends_only_the_rest(tmp_path, autojump_clock):
    data = os.urandom(10_500)
    fake = FakeUploads(data, already=4000)
    fd, rec = artifact(tmp_path, data)
    upload_id = await upload_chunked(await client_for(fake), STATE, rec, fd)
    assert upload_id == "up-1" and fake.received == len(data)
    assert fake.puts[0][0] == 4000
    assert sum(n for _, n in fake.puts) == len(data) - 4000


async def test_failed_chunk_is_retried_alone(tmp_path, autojump_clock):
    data = os.urandom(5000)
    fake = FakeUploads(data, fail_puts={2})
    fd, rec = artifact(tmp_path, data)
    await upload_chunked(await client_for(fake), STATE, rec, fd)
    starts = [first for first, _ in fake.puts]
    assert starts == [0, 1000, 2000, 2000, 3000, 4000]


async def test_416_moves_to_the_coordinators_offset(tmp_path, autojump_clock):
    data = os.urandom(3000)
    fake = FakeUploads(data, already=0)
    fd, rec = artifact(tmp_path, data)
    fake.jump_on_first_put = 2000
    await upload_chunked(await client_for(fake), STATE, rec, fd)
    assert [first for first, _ in fake.puts] == [0, 2000]
    assert fake.received == 3000


async def test_deliver_result_uses_upload_id_and_final_key(tmp_path, autojump_clock):
    big = os.urandom(5000)
    fake = FakeUploads(big, chunk=4096)
    fd, rec = artifact(tmp_path, big)
    small = tmp_path / "small.txt"
    small.write_bytes(b"tiny")
    small_rec = ArtifactRecord("small.txt", "text/plain", 4, hashlib.sha256(b"tiny").hexdigest())
    state = STATE.evolve(artifacts=(rec, small_rec), exit_code=0)
    saved: list[JobState] = []

    async def save(s: JobState) -> None:
        saved.append(s)

    client = await client_for(fake)
    out = await deliver_result(
        client,
        state,
        {"big.bin": fd, "small.txt": os.open(small, os.O_RDONLY)},
        chunk_threshold=1000,
        save=save,
    )
    assert (
        out.artifacts[0].upload_id == "up-1"
        and saved
        and saved[-1].artifacts[0].upload_id == "up-1"
    )
    (result,) = fake.results
    assert result["headers"]["idempotency-key"] == "final-key"
    body = result["body"]
    meta = json.loads(
        body.split(b'name="metadata"', 1)[1].split(b"\r\n\r\n", 1)[1].split(b"\r\n--", 1)[0]
    )
    arts = {a["path"]: a for a in meta["artifacts"]}
    assert arts["big.bin"]["upload_id"] == "up-1" and arts["small.txt"]["upload_id"] is None
    assert body.count(b'name="artifact"') == 1 and b"tiny" in body
    assert meta["node_id"] == "n1" and meta["attempt"] == 2
