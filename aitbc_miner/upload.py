"""Deliver a finished job's result: multipart for small artifacts, chunked and
resumable (PROTOCOL.md "Chunked, resumable artifact upload") above the threshold.

I/O: network and the artifact files. Memory stays flat whatever the size:
chunks are read with pread one at a time; small artifacts are streamed by
httpx from open file descriptors. The sha256 is never recomputed here: it was
computed once while collecting and is kept in state.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping
from contextlib import ExitStack
from typing import Any

import structlog
import trio

from .coordinator import CoordinatorClient
from .errors import ErrorCode, JobFailure
from .journal import ArtifactRecord, JobState
from .metrics import Metrics

log = structlog.get_logger(__name__)

MAX_CHUNK = 16 * 1024 * 1024  # never hold more than this in memory, whatever the server asks
MAX_STALLS = 20  # 416 answers without progress before we give up


async def upload_chunked(
    client: CoordinatorClient,
    state: JobState,
    rec: ArtifactRecord,
    fd: int,
    metrics: Metrics | None = None,
) -> str:
    """Upload one artifact in chunks, resuming where the coordinator stands; returns upload_id."""
    started = await client.upload_start(
        state.job_id,
        {
            "node_id": client.node_id,
            "attempt": state.attempt,
            "path": rec.path,
            "size": rec.size,
            "sha256": rec.sha256,
        },
    )
    chunk = max(1, min(started.chunk_size, MAX_CHUNK))
    offset = started.received
    if offset:
        log.info("upload_resumed", path=rec.path, received=offset, size=rec.size)
    stalls = 0
    while offset < rec.size:
        if offset < 0 or offset > rec.size:
            raise JobFailure(
                ErrorCode.OUTPUT,
                f"coordinator reported offset {offset} for {rec.path}",
                retryable=True,
            )
        length = min(chunk, rec.size - offset)
        data = await trio.to_thread.run_sync(os.pread, fd, length, offset)
        if len(data) != length:
            raise JobFailure(ErrorCode.OUTPUT, f"artifact {rec.path} changed while uploading")
        received, accepted = await client.upload_put(started.upload_id, data, offset, rec.size)
        if accepted:
            if metrics is not None:
                metrics.upload_bytes.inc(length)
            stalls = 0
        else:
            stalls += 1
            log.info("upload_offset_mismatch", path=rec.path, sent_at=offset, received=received)
            if stalls > MAX_STALLS:
                raise JobFailure(
                    ErrorCode.OUTPUT,
                    f"coordinator does not accept chunks of {rec.path}",
                    retryable=True,
                )
        offset = received
    return started.upload_id


def result_metadata(state: JobState) -> dict[str, Any]:
    return {
        "job_id": state.job_id,
        "node_id": None,  # filled by deliver_result
        "attempt": state.attempt,
        "exit_code": state.exit_code,
        "started_at": state.started_at,
        "finished_at": state.finished_at,
        "duration_s": state.duration_s,
        "usage": state.usage,
        "artifacts": [
            {
                "path": a.path,
                "type": a.type,
                "size": a.size,
                "sha256": a.sha256,
                "upload_id": a.upload_id,
            }
            for a in state.artifacts
        ],
    }


async def deliver_result(
    client: CoordinatorClient,
    state: JobState,
    fds: Mapping[str, int],
    *,
    chunk_threshold: int,
    metrics: Metrics | None = None,
    save: Callable[[JobState], Awaitable[None]] | None = None,
) -> JobState:
    """Upload what is missing, then send the result with the state's final key."""
    assert state.final_key is not None
    for rec in state.artifacts:
        if rec.size > chunk_threshold and rec.upload_id is None:
            upload_id = await upload_chunked(client, state, rec, fds[rec.path], metrics)
            state = state.evolve(
                artifacts=tuple(
                    a
                    if a.path != rec.path
                    else ArtifactRecord(a.path, a.type, a.size, a.sha256, upload_id)
                    for a in state.artifacts
                )
            )
            if save is not None:
                await save(state)
    metadata = result_metadata(state)
    metadata["node_id"] = client.node_id
    inline = [a for a in state.artifacts if a.upload_id is None]

    def body(stack: ExitStack) -> dict[str, Any]:
        # metadata is a part of its own so the body is multipart even with no
        # artifacts (httpx would url-encode data= alone).
        parts: list[tuple[str, Any]] = [
            ("metadata", (None, json.dumps(metadata), "application/json"))
        ]
        for rec in inline:
            fh = stack.enter_context(open(fds[rec.path], "rb", closefd=False))
            fh.seek(0)
            parts.append(("artifact", (rec.path, fh, rec.type)))
        return {"files": parts}

    await client.result(body, idempotency_key=state.final_key)
    if metrics is not None:
        metrics.upload_bytes.inc(sum(a.size for a in inline))
    return state
