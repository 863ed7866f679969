"""Byte-moving endpoints of the mock: the multipart job result, the chunked resumable
upload (streamed to disk, never buffered whole) and the /files/ input downloads."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import trio
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .common import SHA256_RE, ApiError, MiB, canonical, field, safe_relpath, sha256_hex
from .pipeline import Call, api_route, read_nothing

if TYPE_CHECKING:
    from .jobs import Job
    from .server import Coordinator
    from .state import Upload

RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def _hash_fileobj(fh: IO[bytes]) -> tuple[int, str]:
    fh.seek(0)
    digest, size = hashlib.sha256(), 0
    while chunk := fh.read(MiB):
        size += len(chunk)
        digest.update(chunk)
    fh.seek(0)
    return size, digest.hexdigest()


def _hash_path(path: Path) -> str:
    with open(path, "rb") as fh:
        return _hash_fileobj(fh)[1]


# -- result ----------------------------------------------------------------------------------
async def read_result(call: Call) -> bytes:
    """Parse the multipart body (parts spool to disk) and hash every artifact part."""
    ctype = call.request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        raise ApiError(415, "Content-Type must be multipart/form-data")
    try:
        form = await call.request.form(max_files=10_000, max_fields=100, max_part_size=MiB)
    except HTTPException as exc:
        raise ApiError(400, f"malformed multipart body: {exc.detail}") from None
    metadata_parts = form.getlist("metadata")
    if len(metadata_parts) != 1:
        raise ApiError(422, "expected exactly one 'metadata' part")
    raw = metadata_parts[0]
    data = await raw.read() if isinstance(raw, UploadFile) else raw.encode()
    try:
        metadata = json.loads(data)
    except ValueError:
        raise ApiError(400, "metadata part is not valid JSON") from None
    if not isinstance(metadata, dict):
        raise ApiError(422, "metadata must be a JSON object")
    call.body = metadata
    parts = []
    for name, value in form.multi_items():
        if name != "artifact":
            continue
        if not isinstance(value, UploadFile):
            raise ApiError(422, "an 'artifact' part has no filename")
        size, digest = await trio.to_thread.run_sync(_hash_fileobj, value.file)
        parts.append(
            {"name": value.filename or "", "size": size, "sha256": digest, "file": value.file}
        )
    call.extra["parts"] = parts
    summary = sorted([p["name"], p["size"], p["sha256"]] for p in parts)
    return canonical(metadata) + b"\n" + canonical(summary)


def _validate_metadata(meta: dict[str, Any]) -> None:
    field(meta, "job_id", "str")
    field(meta, "node_id", "str")
    field(meta, "attempt", "int")
    field(meta, "exit_code", "int")
    for name in ("started_at", "finished_at"):
        stamp = field(meta, name, "str", required=False, nullable=True)
        if stamp is not None:
            try:
                dt.datetime.fromisoformat(stamp)
            except ValueError:
                raise ApiError(422, f"{name} is not an RFC 3339 timestamp") from None
    field(meta, "duration_s", "number", required=False, nullable=True)
    field(meta, "usage", "object", required=False, nullable=True)
    for i, art in enumerate(field(meta, "artifacts", "list")):
        if not isinstance(art, dict):
            raise ApiError(422, f"artifacts[{i}] must be an object")
        field(art, "path", "str")
        if field(art, "size", "int") < 0:
            raise ApiError(422, f"artifacts[{i}].size must be >= 0")
        if not SHA256_RE.match(field(art, "sha256", "str")):
            raise ApiError(422, f"artifacts[{i}].sha256 must be 64 lowercase hex digits")
        field(art, "type", "str", required=False, nullable=True)
        field(art, "upload_id", "str", required=False, nullable=True)


def _plan_artifacts(
    coord: Coordinator, job: Job, meta: dict[str, Any], parts: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Match metadata artifacts to parts or completed uploads; 422 on any disagreement."""
    by_name: dict[str, dict[str, Any]] = {}
    for part in parts:
        name = safe_relpath(part["name"], "artifact part filename")
        if name in by_name:
            raise ApiError(422, f"two artifact parts named {name!r}")
        by_name[name] = part
    plan, seen = [], set()
    for i, art in enumerate(meta["artifacts"]):
        path = safe_relpath(art["path"], f"artifacts[{i}].path")
        if path in seen:
            raise ApiError(422, f"artifact {path!r} listed twice")
        seen.add(path)
        declared = (art["size"], art["sha256"])
        upload_id = art.get("upload_id")
        if upload_id is not None:
            up = coord.state.uploads.get(upload_id)
            if up is None or up.job_id != job.id or up.path != path:
                raise ApiError(422, f"unknown upload_id {upload_id!r} for {path!r}")
            if up.attempt != job.attempt:
                raise ApiError(422, f"upload {upload_id} belongs to attempt {up.attempt}")
            if not up.complete:
                raise ApiError(
                    422, f"upload {upload_id} is incomplete", received=up.received, size=up.size
                )
            if (up.size, up.sha256) != declared:
                raise ApiError(422, f"size/sha256 of {path!r} disagree with upload {upload_id}")
            if path in by_name:
                raise ApiError(422, f"{path!r} sent both as a part and as an upload")
            source: Any = coord.data_dir / "uploads" / f"{upload_id}.part"
        else:
            part = by_name.get(path)
            if part is None:
                raise ApiError(422, f"no artifact part for {path!r}")
            if part["size"] != art["size"]:
                raise ApiError(
                    422,
                    f"size mismatch for {path!r}: metadata says {art['size']}, "
                    f"part has {part['size']}",
                )
            if part["sha256"] != art["sha256"]:
                raise ApiError(422, f"sha256 mismatch for {path!r}")
            source = part["file"]
        plan.append(
            {
                "path": path,
                "size": art["size"],
                "sha256": art["sha256"],
                "type": art.get("type"),
                "upload_id": upload_id,
                "source": source,
            }
        )
    listed = {p["path"] for p in plan if p["upload_id"] is None}
    extra = sorted(set(by_name) - listed)
    if extra:
        raise ApiError(422, f"artifact parts not listed in metadata: {extra}")
    return plan


def _store(plan: list[dict[str, Any]], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for item in plan:
        target = root / item["path"]
        if not target.resolve().is_relative_to(root.resolve()):
            raise ValueError(f"{item['path']!r} escapes the artifact directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        source = item["source"]
        if isinstance(source, Path):
            shutil.copyfile(source, tmp)
        else:
            source.seek(0)
            with open(tmp, "wb") as out:
                shutil.copyfileobj(source, out, MiB)
        tmp.replace(target)


async def result(call: Call) -> tuple[int, Any]:
    meta, coord, node = call.body, call.coord, call.node
    assert node is not None
    _validate_metadata(meta)
    ref, attempt = meta["job_id"], meta["attempt"]
    board = coord.state.jobs
    async with coord.result_lock:
        known = board.find(ref, node.node_id)
        if known is not None and known.state == "succeeded":
            call.job = known
            raise ApiError(409, "job already has an accepted result", state=known.state)
        job = call.job = board.held(ref, node.node_id, attempt)
        if job.cancel_requested:
            raise ApiError(409, "job cancelled")
        plan = _plan_artifacts(coord, job, meta, call.extra["parts"])
        root = coord.data_dir / "artifacts" / job.storage_key / str(attempt)
        await trio.to_thread.run_sync(_store, plan, root)
        job = board.held(ref, node.node_id, attempt)  # the lease may have run out meanwhile
        now = coord.now()
        if job.state == "leased":
            node.violation("result_before_ack", ref, now)
        declared = job.manifest.get("artifacts")
        if isinstance(declared, list):
            missing = [
                a.get("path")
                for a in declared
                if isinstance(a, dict) and a.get("path") not in {p["path"] for p in plan}
            ]
            if missing:
                node.violation("result_missing_declared_artifacts", repr(missing), now)
        records = [
            {k: v for k, v in p.items() if k != "source"} | {"attempt": attempt} for p in plan
        ]
        board.accept_result(job, meta, records, now)
    coord.board_changed.notify()
    return 200, {"accepted": True, "job_id": job.job_id, "attempt": attempt}


def _replay_result(record: dict[str, Any]) -> Any:
    if record["status"] == 200:
        return {**record["body"], "duplicate": True}
    return record["body"]


# -- chunked upload ------------------------------------------------------------------------------
def upload_file(coord: Coordinator, upload_id: str) -> Path:
    return coord.data_dir / "uploads" / f"{upload_id}.part"


async def upload_start(call: Call) -> tuple[int, Any]:
    body, coord, node = call.body, call.coord, call.node
    assert node is not None
    field(body, "node_id", "str")
    attempt = field(body, "attempt", "int")
    path = safe_relpath(field(body, "path", "str"))
    size = field(body, "size", "int")
    sha = field(body, "sha256", "str")
    if size < 0:
        raise ApiError(422, "size must be >= 0")
    if not SHA256_RE.match(sha):
        raise ApiError(422, "sha256 must be 64 lowercase hex digits")
    call.job_ref = call.request.path_params["job_id"]
    job = call.job = coord.state.jobs.held(call.job_ref, node.node_id, attempt)
    now = coord.now()
    if job.state == "leased":
        node.violation("upload_before_ack", call.job_ref, now)
    if size == 0 and sha != sha256_hex(b""):
        raise ApiError(422, "sha256 does not match an empty file")
    up = coord.state.uploads.start(
        job.id, attempt, node.node_id, path, size, sha, job.chunk_size or coord.opts.chunk_size, now
    )
    target = upload_file(coord, up.upload_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch()
    up.complete = up.complete or size == 0
    return 200, {"upload_id": up.upload_id, "chunk_size": up.chunk_size, "received": up.received}


async def read_put(call: Call) -> bytes:
    up = call.upload
    if up is None or up.node_id != call.node_id:
        raise ApiError(404, "unknown upload")
    call.job_ref, call.attempt = up.job_id, up.attempt
    header = call.request.headers.get("content-range", "")
    match = RANGE_RE.match(header.strip())
    if match is None:
        raise ApiError(400, "malformed Content-Range; expected 'bytes FIRST-LAST/SIZE'")
    first, last, total = (int(g) for g in match.groups())
    if first > last or last >= total:
        raise ApiError(400, "malformed Content-Range; expected FIRST <= LAST < SIZE")
    if total != up.size:
        raise ApiError(400, f"Content-Range size {total} is not the upload size {up.size}")
    call.extra["range"] = (first, last)
    return f"{up.upload_id} {header.strip()}".encode()


async def _write_chunk(call: Call, up: Upload, target: Path) -> int:
    """Stream the request body to `target` at offset `received`; return bytes written."""
    written = 0
    stats = call.coord.state.stats
    async with await trio.open_file(target, "r+b" if target.exists() else "w+b") as fh:
        await fh.truncate(up.received)  # drop leftovers of an earlier broken chunk
        await fh.seek(up.received)
        try:
            async for chunk in call.request.stream():
                written += len(chunk)
                up.bytes_put_total += len(chunk)
                stats.upload_bytes += len(chunk)
                await fh.write(chunk)
        except ClientDisconnect:
            await fh.truncate(up.received)
            raise
    return written


async def upload_put(call: Call) -> tuple[int, Any]:
    coord, up, node = call.coord, call.upload, call.node
    assert up is not None and node is not None
    first, last = call.extra["range"]
    async with coord.upload_lock(up.upload_id):
        call.job = coord.state.jobs.held(up.job_id, node.node_id, up.attempt)
        if first != up.received:
            up.rejected_puts += 1
            raise ApiError(416, "chunk does not start at received", received=up.received)
        target = upload_file(coord, up.upload_id)
        written = await _write_chunk(call, up, target)
        if written != last - first + 1:
            up.rejected_puts += 1
            with open(target, "r+b") as fh:
                fh.truncate(up.received)
            raise ApiError(
                400,
                f"body has {written} bytes, Content-Range says {last - first + 1}",
                received=up.received,
            )
        up.received += written
        if up.received == up.size:
            digest = await trio.to_thread.run_sync(_hash_path, target)
            if digest != up.sha256:
                up.received, up.resets = 0, up.resets + 1
                with open(target, "r+b") as fh:
                    fh.truncate(0)
                raise ApiError(422, "sha256 mismatch; upload reset", received=0)
            up.complete = True
    return 200, {"received": up.received}


async def upload_status(call: Call) -> tuple[int, Any]:
    up = call.coord.state.uploads.get(call.request.path_params["upload_id"])
    if up is None or up.node_id != call.node_id:
        raise ApiError(404, "unknown upload")
    return 200, up.status()


# -- input files ----------------------------------------------------------------------------------
async def serve_file(request: Request) -> Response:
    coord: Coordinator = request.app.state.coord
    name = request.path_params["name"]
    meta = coord.state.files.get(name)
    if meta is None:
        coord.state.stats.requests["files 404"] += 1
        return JSONResponse({"error": "no such file"}, status_code=404)
    counted = request.method == "GET"
    if counted:
        meta["requests"] += 1
        if "authorization" in request.headers:
            meta["with_auth"] += 1  # a miner must not send its token to input URLs
    if counted and meta["fail_times"] > 0:
        meta["fail_times"] -= 1
        meta["failed"] += 1
        status = meta.get("status", 503)
        coord.state.stats.requests[f"files {status}"] += 1
        headers = {}
        if meta.get("retry_after") is not None:
            headers["Retry-After"] = str(meta["retry_after"])
        coord.persist()
        return JSONResponse({"error": "injected file failure"}, status_code=status, headers=headers)
    if counted:
        meta["downloads"] += 1
        coord.state.stats.requests["files 200"] += 1
        coord.persist()
    return FileResponse(
        coord.data_dir / "files" / meta["stored_as"],
        media_type=meta.get("content_type") or "application/octet-stream",
    )


def routes() -> list[Route]:
    return [
        api_route("jobs/result", "jobs/result", result, reader=read_result, replay=_replay_result),
        api_route("jobs/{job_id}/uploads", "jobs/uploads", upload_start),
        api_route("uploads/{upload_id}", "uploads/put", upload_put, method="PUT", reader=read_put),
        api_route(
            "uploads/{upload_id}", "uploads/get", upload_status, method="GET", reader=read_nothing
        ),
        Route("/files/{name:path}", serve_file, methods=["GET"]),
    ]
