"""The mock's /admin API for tests and the demo: enqueue and inspect jobs, inspect and
steer nodes, inject faults, publish input files, read counters. JSON, no auth, loopback
clients only; never subject to fault injection. Not part of the miner's contract."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import trio
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .common import ApiError, is_kind, safe_relpath
from .signing import SIGN_MODES

if TYPE_CHECKING:
    from .server import Coordinator

AdminHandler = Callable[[Request, "Coordinator"], Awaitable[Any]]


def _is_loopback(request: Request) -> bool:
    host = request.client.host if request.client else ""
    return host.startswith("127.") or host in ("::1", "localhost")


def admin_route(path: str, handler: AdminHandler, methods: list[str]) -> Route:
    """JSON in/out, loopback check, ApiError -> JSON, persist after mutations."""

    async def endpoint(request: Request) -> Response:
        coord: Coordinator = request.app.state.coord
        if not _is_loopback(request):
            return JSONResponse({"error": "admin API is loopback-only"}, status_code=403)
        try:
            coord.tick()
            answer = await handler(request, coord)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        if request.method != "GET":
            coord.persist()
        return answer if isinstance(answer, Response) else JSONResponse(answer)

    return Route("/admin" + path, endpoint, methods=methods)


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def _option(
    body: dict[str, Any], name: str, kind: str, check: Callable[[Any], bool], rule: str
) -> Any:
    value = body.get(name)
    if value is not None and not (is_kind(value, kind) and check(value)):
        raise ApiError(400, f"{name} must be {rule}")
    return value


# -- jobs ---------------------------------------------------------------------------------------
async def enqueue(request: Request, coord: Coordinator) -> Any:
    body = await _json(request)
    sign = body.get("sign", "ed25519")
    if sign not in SIGN_MODES:
        raise ApiError(400, f"sign must be one of {list(SIGN_MODES)}")
    if sign == "hmac" and coord.signer.hmac_secret is None:
        raise ApiError(400, "sign 'hmac' needs the mock started with --hmac-secret")
    opts = {
        "sign": sign,
        "lease_s": _option(body, "lease_s", "number", lambda v: v > 0, "a positive number"),
        "retry": _option(body, "retry", "bool", lambda v: True, "a boolean"),
        "raw": _option(body, "raw", "bool", lambda v: True, "a boolean"),
        "chunk_size": _option(body, "chunk_size", "int", lambda v: v > 0, "a positive integer"),
        "max_attempts": _option(body, "max_attempts", "int", lambda v: v > 0, "a positive integer"),
    }
    if "jobs" in body:
        manifests, many = body["jobs"], True
        if not isinstance(manifests, list):
            raise ApiError(400, "jobs must be a list of JSON objects")
    elif "job" in body:
        manifests, many = [body["job"]], False
    else:
        raise ApiError(400, "body needs 'job' (an object) or 'jobs' (a list of objects)")
    if not all(isinstance(m, dict) for m in manifests):
        raise ApiError(400, "every job must be a JSON object")
    ids = [coord.state.jobs.enqueue(m, coord.now(), **opts).id for m in manifests]
    coord.board_changed.notify()
    return {"ids": ids} if many else {"id": ids[0]}


def _job(coord: Coordinator, job_id: str) -> Any:
    job = coord.state.jobs.lookup(job_id)
    if job is None:
        raise ApiError(404, "no such job")
    return job


async def list_jobs(request: Request, coord: Coordinator) -> Any:
    wanted = request.query_params.get("state")
    jobs = sorted(coord.state.jobs.jobs.values(), key=lambda j: j.enqueued_at)
    return [j.summary() for j in jobs if wanted is None or j.state == wanted]


async def get_job(request: Request, coord: Coordinator) -> Any:
    return _job(coord, request.path_params["id"]).describe()


async def get_artifact(request: Request, coord: Coordinator) -> Any:
    job = _job(coord, request.path_params["id"])
    path = request.path_params["path"]
    for art in job.artifacts:
        if art["path"] == path:
            stored = coord.data_dir / "artifacts" / job.storage_key / str(art["attempt"]) / path
            return FileResponse(stored, media_type="application/octet-stream")
    raise ApiError(404, "no such artifact in the accepted result")


async def cancel_job(request: Request, coord: Coordinator) -> Any:
    job = _job(coord, request.path_params["id"])
    coord.state.jobs.cancel(job, coord.now())
    coord.board_changed.notify()
    return {"id": job.id, "state": job.state, "cancel_requested": True}


# -- nodes ----------------------------------------------------------------------------------------
async def list_nodes(request: Request, coord: Coordinator) -> Any:
    return [n.summary() for n in coord.state.nodes.nodes.values()]


async def get_node(request: Request, coord: Coordinator) -> Any:
    node = coord.state.nodes.get(request.path_params["node_id"])
    if node is None:
        raise ApiError(404, "no such node")
    return node.describe()


async def set_node_status(request: Request, coord: Coordinator) -> Any:
    body = await _json(request)
    node = coord.state.nodes.set_status(request.path_params["node_id"], body.get("status"))
    coord.board_changed.notify()  # long polls of a node that is no longer active return
    return node.summary()


async def revoke_node(request: Request, coord: Coordinator) -> Any:
    node_id = request.path_params["node_id"]
    if coord.state.nodes.get(node_id) is None:
        raise ApiError(404, "no such node")
    return {"node_id": node_id, "revoked": coord.state.nodes.revoke(node_id)}


# -- faults ---------------------------------------------------------------------------------
async def add_fault(request: Request, coord: Coordinator) -> Any:
    try:
        fault = coord.faults.add(await _json(request))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return dataclasses.asdict(fault)


async def list_faults(request: Request, coord: Coordinator) -> Any:
    return {"faults": coord.faults.describe()}


async def clear_faults(request: Request, coord: Coordinator) -> Any:
    count = len(coord.faults.faults)
    coord.faults.clear()
    return {"cleared": count}


# -- files -----------------------------------------------------------------------------------------
async def _file_source(request: Request) -> tuple[dict[str, Any], Any]:
    """(options, bytes or an async chunk iterator) from a JSON or a raw-bytes request."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        body = await _json(request)
        try:
            data = base64.b64decode(body.get("content_b64", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ApiError(400, "content_b64 must be base64") from None
        return body, data
    opts: dict[str, Any] = dict(request.query_params)
    for name in ("fail_times", "status"):
        if name in opts:
            try:
                opts[name] = int(opts[name])
            except ValueError:
                raise ApiError(400, f"{name} must be an integer") from None
    return opts, request.stream()


async def add_file(request: Request, coord: Coordinator) -> Any:
    opts, source = await _file_source(request)
    name = safe_relpath(opts.get("name"), "name")
    fail_times = opts.get("fail_times", 0)
    status = opts.get("status", 503)
    if not is_kind(fail_times, "int") or fail_times < 0:
        raise ApiError(400, "fail_times must be a non-negative integer")
    if not is_kind(status, "int") or not 400 <= status <= 599:
        raise ApiError(400, "status must be an HTTP error status")
    target = coord.data_dir / "files" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    async with await trio.open_file(target, "wb") as fh:
        chunks = [source] if isinstance(source, bytes) else source
        async for chunk in _aiter(chunks):
            digest.update(chunk)
            size += len(chunk)
            await fh.write(chunk)
    meta = {
        "name": name,
        "stored_as": name,
        "size": size,
        "sha256": digest.hexdigest(),
        "fail_times": fail_times,
        "status": status,
        "retry_after": opts.get("retry_after"),
        "content_type": opts.get("content_type"),
        "requests": 0,
        "downloads": 0,
        "failed": 0,
        "with_auth": 0,
    }
    coord.state.files[name] = meta
    return {
        "name": name,
        "url": f"{coord.base}/files/{quote(name)}",
        "sha256": meta["sha256"],
        "size": size,
    }


async def _aiter(source: Any) -> Any:
    if isinstance(source, list):
        for item in source:
            yield item
    else:
        async for item in source:
            yield item


async def list_files(request: Request, coord: Coordinator) -> Any:
    return list(coord.state.files.values())


# -- uploads and stats ------------------------------------------------------------------------
async def list_uploads(request: Request, coord: Coordinator) -> Any:
    return [dataclasses.asdict(u) for u in coord.state.uploads.uploads.values()]


async def get_upload(request: Request, coord: Coordinator) -> Any:
    up = coord.state.uploads.get(request.path_params["upload_id"])
    if up is None:
        raise ApiError(404, "no such upload")
    return dataclasses.asdict(up)


async def stats(request: Request, coord: Coordinator) -> Any:
    state = coord.state
    return {
        **state.stats.to_json(),
        "downloads": {
            name: {k: f[k] for k in ("requests", "downloads", "failed", "with_auth")}
            for name, f in state.files.items()
        },
        "jobs_by_state": dict(Counter(j.state for j in state.jobs.jobs.values())),
        "results_accepted": sum(j.results_accepted for j in state.jobs.jobs.values()),
        "nodes": len(state.nodes.nodes),
        "violations": sum(n.violations for n in state.nodes.nodes.values()),
        "waiting_pulls": coord.waiting_pulls,
    }


async def health(request: Request, coord: Coordinator) -> Any:
    return {"ok": True, "url": coord.api_url, "public_key": coord.signer.public_key}


def routes() -> list[Route]:
    return [
        admin_route("/health", health, ["GET"]),
        admin_route("/jobs", enqueue, ["POST"]),
        admin_route("/jobs", list_jobs, ["GET"]),
        # ids may contain "/" (invalid manifests are enqueued as given): most specific first
        admin_route("/jobs/{id:path}/artifacts/{path:path}", get_artifact, ["GET"]),
        admin_route("/jobs/{id:path}/cancel", cancel_job, ["POST"]),
        admin_route("/jobs/{id:path}", get_job, ["GET"]),
        admin_route("/nodes", list_nodes, ["GET"]),
        admin_route("/nodes/{node_id}", get_node, ["GET"]),
        admin_route("/nodes/{node_id}/status", set_node_status, ["POST"]),
        admin_route("/nodes/{node_id}/revoke", revoke_node, ["POST"]),
        admin_route("/faults", add_fault, ["POST"]),
        admin_route("/faults", list_faults, ["GET"]),
        admin_route("/faults", clear_faults, ["DELETE"]),
        admin_route("/files", add_file, ["POST"]),
        admin_route("/files", list_files, ["GET"]),
        admin_route("/uploads", list_uploads, ["GET"]),
        admin_route("/uploads/{upload_id}", get_upload, ["GET"]),
        admin_route("/stats", stats, ["GET"]),
    ]
