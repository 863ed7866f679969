"""The pipeline every /api/v1 call of the mock goes through: bearer auth, the
Idempotency-Key rule (replay of first answers, 422 on reuse with a different request),
call history, counters, persistence and draining of unread bodies. No endpoint logic."""

from __future__ import annotations

import dataclasses
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .common import SAFE_ID_RE, ApiError, canonical, field, sha256_hex

if TYPE_CHECKING:
    from .jobs import Job
    from .nodes import Node
    from .server import Coordinator
    from .state import Upload


@dataclasses.dataclass
class Call:
    """One API request on its way through the pipeline."""

    coord: Coordinator
    request: Request
    endpoint: str
    node: Node | None = None
    node_id: str | None = None
    body: Any = None
    idem_key: str | None = None
    job: Job | None = None
    job_ref: Any = None
    attempt: Any = None
    upload: Upload | None = None
    disconnected: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


Reader = Callable[[Call], Awaitable[bytes]]  # parses the body; returns fingerprint material
Handler = Callable[[Call], Awaitable[tuple[int, Any]]]
Replay = Callable[[dict[str, Any]], Any]


async def read_json(call: Call) -> bytes:
    ctype = call.request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
    raw = await call.request.body()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "body must be a JSON object")
    call.body = body
    return canonical(body)


async def read_nothing(call: Call) -> bytes:
    return b""


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def api_route(
    path: str,
    endpoint: str,
    handler: Handler,
    *,
    method: str = "POST",
    auth: str = "node",
    reader: Reader = read_json,
    replay: Replay | None = None,
) -> Route:
    """Wrap `handler` in the common pipeline and mount it under /api/v1."""
    mutating = method in ("POST", "PUT")

    async def asgi_endpoint(request: Request) -> JSONResponse:
        coord: Coordinator = request.app.state.coord
        call = Call(coord, request, endpoint)
        started = time.monotonic()
        if endpoint == "uploads/put":
            call.upload = coord.state.uploads.get(request.path_params["upload_id"])
            if call.upload is not None:
                call.upload.puts += 1
        replayed = False
        try:
            status, body, replayed = await _process(call, handler, auth, mutating, reader, replay)
        except ClientDisconnect:
            call.disconnected = True
            status, body = 499, {"error": "client disconnected"}
        finally:
            await _drain(call)
            await request.close()
        _record(call, status, replayed)
        if mutating:
            coord.persist()
        coord.log(
            endpoint=endpoint,
            status=status,
            node_id=call.node_id,
            replayed=replayed,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return JSONResponse(body, status_code=status)

    return Route("/api/v1/" + path, asgi_endpoint, methods=[method])


async def _process(
    call: Call, handler: Handler, auth: str, mutating: bool, reader: Reader, replay: Replay | None
) -> tuple[int, Any, bool]:
    coord = call.coord
    try:
        coord.tick()
        token = _bearer(call.request)
        if auth == "bootstrap":
            expected = coord.opts.bootstrap_token.encode()
            if token is None or not hmac.compare_digest(token.encode(), expected):
                raise ApiError(401, "bad bootstrap token")
        else:
            call.node = coord.state.nodes.authenticate(token, coord.now())
            call.node_id = call.node.node_id
        if mutating:
            call.idem_key = call.request.headers.get("idempotency-key") or None
            if call.idem_key is None:
                raise ApiError(400, "missing Idempotency-Key header")
        material = await reader(call)
        _check_identity(call, auth)
        if not mutating:
            status, body = await _run(handler, call)
            return status, body, False
        return await _idempotent(call, material, handler, replay)
    except ApiError as exc:
        return exc.status, exc.body(), False


def _check_identity(call: Call, auth: str) -> None:
    body = call.body if isinstance(call.body, dict) else {}
    call.job_ref, call.attempt = body.get("job_id"), body.get("attempt")
    if auth == "bootstrap":
        node_id = field(body, "node_id", "str")
        if not SAFE_ID_RE.match(node_id):
            raise ApiError(422, "node_id must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
        call.node_id = node_id
        return
    node = call.node
    assert node is not None
    if node.status == "banned":
        raise ApiError(403, "node banned")
    if "node_id" in body and body["node_id"] != node.node_id:
        raise ApiError(422, "node_id does not match the bearer token's node")
    if node.deregistered and call.endpoint != "nodes/deregister":
        node.violation("call_after_deregister", call.endpoint, call.coord.now())


async def _run(handler: Handler, call: Call) -> tuple[int, Any]:
    try:
        return await handler(call)
    except ApiError as exc:
        return exc.status, exc.body()


async def _idempotent(
    call: Call, material: bytes, handler: Handler, replay: Replay | None
) -> tuple[int, Any, bool]:
    """Run `handler` once per (node, endpoint, key); repeats get the stored first answer."""
    coord = call.coord
    scope = f"{call.node_id}|{call.endpoint}|{call.idem_key}"
    fingerprint = sha256_hex(f"{call.endpoint}\n{call.request.url.path}\n".encode() + material)
    while (busy := coord.inflight.get(scope)) is not None:
        await busy.wait()  # the first request with this key is still being answered
    record = coord.state.idempotency.lookup(scope, fingerprint)
    if record is not None:
        body = replay(record) if replay is not None else record["body"]
        return record["status"], body, True
    done = coord.inflight[scope] = trio.Event()
    try:
        status, body = await _run(handler, call)
        if status < 500 and not call.disconnected:
            coord.state.idempotency.store(scope, fingerprint, status, body, coord.now())
    finally:
        del coord.inflight[scope]
        done.set()
    return status, body, False


async def _drain(call: Call) -> None:
    """Read any unread request body so the connection stays usable; count upload bytes."""
    if call.disconnected:
        return  # nothing more will arrive; another receive() would wait forever
    total = 0
    try:
        async for chunk in call.request.stream():
            total += len(chunk)
    except (RuntimeError, ClientDisconnect):  # already consumed, or the client is gone
        pass
    if call.upload is not None and total:
        call.upload.bytes_put_total += total
        call.coord.state.stats.upload_bytes += total


def _record(call: Call, status: int, replayed: bool) -> None:
    coord = call.coord
    state = coord.state
    state.stats.requests[f"{call.endpoint} {status}"] += 1
    node = call.node or (state.nodes.get(call.node_id) if call.node_id else None)
    job = call.job
    if job is None and isinstance(call.job_ref, str) and call.node_id:
        job = state.jobs.find(call.job_ref, call.node_id)
    entry = {
        "ts": coord.now(),
        "endpoint": call.endpoint,
        "status": status,
        "idempotency_key": call.idem_key,
        "replayed": replayed,
    }
    if job is not None or call.job_ref is not None:
        entry["job_id"] = job.job_id if job is not None else call.job_ref
        entry["attempt"] = call.attempt
    if node is not None:
        node.calls.append(entry)
    if job is not None:
        job.history.append({**entry, "node_id": call.node_id})
