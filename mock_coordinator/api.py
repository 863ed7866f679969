"""/api/v1 node and JSON job endpoints of the mock (register, heartbeat, deregister, pull
with long poll, ack, progress, fail). They validate bodies and call the pure state in
nodes.py/jobs.py; auth and idempotency are done by pipeline.py."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio
from starlette.routing import Route

from .common import ERROR_CODES, ApiError, field, rfc3339, str_list
from .jobs import ACTIVE
from .pipeline import Call, api_route

if TYPE_CHECKING:
    from .jobs import Job
    from .nodes import Node

MAX_WAIT_S = 60.0


# -- node endpoints ---------------------------------------------------------------------------
_DESCRIPTOR_KINDS = {
    "version": "str",
    "cpu": "object",
    "memory_mb": "number",
    "disk_free_mb": "number",
    "gpu": "list",
    "runners": "list",
    "slots": "object",
    "tags": "list",
}


async def register(call: Call) -> tuple[int, Any]:
    body, coord = call.body, call.coord
    for name, kind in _DESCRIPTOR_KINDS.items():
        field(body, name, kind, required=False)
    node, token = coord.state.nodes.register(body["node_id"], body, coord.now())
    call.node = node
    answer: dict[str, Any] = {
        "node_token": token,
        "expires_at": rfc3339(node.token_expires_at or 0),
        "status": "active" if node.status == "active" else "pending",
    }
    if coord.opts.heartbeat_interval_s is not None:
        answer["heartbeat_interval_s"] = coord.opts.heartbeat_interval_s
    return 200, answer


async def heartbeat(call: Call) -> tuple[int, Any]:
    body, coord, node = call.body, call.coord, call.node
    assert node is not None
    field(body, "node_id", "str")
    field(body, "seq", "int")
    if field(body, "state", "str") not in ("active", "draining"):
        raise ApiError(422, "state must be 'active' or 'draining'")
    running = str_list(body, "running_jobs", required=False) or []
    for name, kind in (
        ("load", "object"),
        ("free_mb", "number"),
        ("disk_free_mb", "number"),
        ("gpu_free", "list"),
    ):
        field(body, name, kind, required=False)
    now = coord.now()
    node.heartbeats.append({"ts": now, "mono": time.monotonic(), "body": body})
    board = coord.state.jobs
    for ref in running:
        job = board.find(ref, node.node_id)
        if job is not None and job.holder == node.node_id and job.state in ACTIVE:
            board.extend(job, now)
    cancel = [
        str(j.job_id)
        for j in board.jobs.values()
        if j.holder == node.node_id and j.state in ACTIVE and j.cancel_requested
    ]
    return 200, {"status": node.status, "cancel": cancel}


async def deregister(call: Call) -> tuple[int, Any]:
    coord, node = call.coord, call.node
    assert node is not None
    field(call.body, "node_id", "str")
    held = [
        str(j.job_id)
        for j in coord.state.jobs.jobs.values()
        if j.holder == node.node_id and j.state in ACTIVE
    ]
    if held:
        node.violation("deregister_holding_jobs", ", ".join(held), coord.now())
    node.deregistered = True
    node.deregistered_at = coord.now()
    return 200, {"status": "deregistered"}


# -- JSON job endpoints -------------------------------------------------------------------------
def _require_can_hold(call: Call) -> Node:
    node = call.node
    assert node is not None
    if node.status == "pending":
        node.violation(f"{call.endpoint}_while_pending", "node status is pending", call.coord.now())
        raise ApiError(403, "node pending")
    if node.status != "active":
        raise ApiError(403, f"node {node.status}")
    return node


def _validate_filters(body: dict[str, Any]) -> dict[str, Any]:
    filters = field(body, "filters", "object", required=False) or {}
    str_list(filters, "runners", required=False)
    str_list(filters, "tags", required=False)
    for name in ("gpu_slots_free", "cpu_slots_free"):
        value = field(filters, name, "int", required=False)
        if value is not None and value < 0:
            raise ApiError(422, f"filters.{name} must be >= 0")
    vram = field(filters, "vram_free_mb", "list", required=False) or []
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vram):
        raise ApiError(422, "filters.vram_free_mb must be a list of numbers")
    return filters


async def pull(call: Call) -> tuple[int, Any]:
    body, coord = call.body, call.coord
    field(body, "node_id", "str")
    filters = _validate_filters(body)
    wait_s = field(body, "wait_s", "number", required=False) or 0
    if wait_s < 0:
        raise ApiError(422, "wait_s must be >= 0")
    node = _require_can_hold(call)
    board = coord.state.jobs
    job = board.take(node.node_id, filters, coord.now())
    if job is None and wait_s > 0:
        job = await _long_poll(call, node, filters, trio.current_time() + min(wait_s, MAX_WAIT_S))
    if job is None:
        return 200, {"job": None, "lease": None, "signature": None}
    call.job, call.job_ref, call.attempt = job, job.job_id, job.attempt
    wire, signature = coord.signer.sign(board.wire_job(job), job.sign)
    job.attempts[-1]["sign"] = job.sign
    coord.board_changed.notify()  # the lease timer learns the new deadline
    return 200, {"job": wire, "lease": job.lease, "signature": signature}


async def _long_poll(
    call: Call, node: Node, filters: dict[str, Any], deadline: float
) -> Job | None:
    """Wait for a matching job until `deadline`, giving up if the client goes away."""
    coord = call.coord
    job = None

    async def watch_disconnect(scope: trio.CancelScope) -> None:
        while (await call.request.receive())["type"] != "http.disconnect":
            pass
        call.disconnected = True
        scope.cancel()

    coord.waiting_pulls += 1
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            with trio.move_on_at(deadline):
                while job is None and node.status == "active" and not coord.shutting_down.is_set():
                    await coord.board_changed.wait()
                    if node.status == "active" and not coord.shutting_down.is_set():
                        job = coord.state.jobs.take(node.node_id, filters, coord.now())
            nursery.cancel_scope.cancel()
    finally:
        coord.waiting_pulls -= 1
    return job


def _job_fields(call: Call) -> tuple[str, int]:
    field(call.body, "node_id", "str")
    return field(call.body, "job_id", "str"), field(call.body, "attempt", "int")


async def ack(call: Call) -> tuple[int, Any]:
    ref, attempt = _job_fields(call)
    lease_id = field(call.body, "lease_id", "str")
    node = _require_can_hold(call)
    board = call.coord.state.jobs
    job = call.job = board.held(ref, node.node_id, attempt)
    board.ack(job, lease_id, call.coord.now())
    return 200, {"ok": True, "lease": job.lease}


async def progress(call: Call) -> tuple[int, Any]:
    ref, attempt = _job_fields(call)
    pct = field(call.body, "pct", "number")
    note = field(call.body, "note", "str", required=False, nullable=True)
    if not 0 <= pct <= 100:
        raise ApiError(422, "pct must be within 0..100")
    coord, node = call.coord, call.node
    assert node is not None
    job = call.job = coord.state.jobs.held(ref, node.node_id, attempt)
    now = coord.now()
    if job.state == "leased":
        node.violation("progress_before_ack", ref, now)
    coord.state.jobs.extend(job, now)
    job.progress.append({"ts": now, "attempt": attempt, "pct": pct, "note": note})
    return 200, {"cancel": job.cancel_requested}


async def fail(call: Call) -> tuple[int, Any]:
    ref, attempt = _job_fields(call)
    body = call.body
    code = field(body, "error_code", "str")
    if code not in ERROR_CODES:
        raise ApiError(422, f"unknown error_code {code!r}", known=sorted(ERROR_CODES))
    report = {
        "error_code": code,
        "error_msg": field(body, "error_msg", "str"),
        "retryable": field(body, "retryable", "bool"),
        "logs_ref": field(body, "logs_ref", "str", required=False, nullable=True),
        "logs_tail": field(body, "logs_tail", "str", required=False, nullable=True),
    }
    coord, node = call.coord, call.node
    assert node is not None
    job = call.job = coord.state.jobs.held(ref, node.node_id, attempt)
    now = coord.now()
    if code == "E_INVALID" and report["retryable"]:
        node.violation("retryable_E_INVALID", ref, now)
    state = coord.state.jobs.fail(job, report, now)
    coord.board_changed.notify()
    return 200, {"ok": True, "state": state}


def routes() -> list[Route]:
    return [
        api_route("nodes/register", "nodes/register", register, auth="bootstrap"),
        api_route("nodes/heartbeat", "nodes/heartbeat", heartbeat),
        api_route("nodes/deregister", "nodes/deregister", deregister),
        api_route("jobs/pull", "jobs/pull", pull),
        api_route("jobs/ack", "jobs/ack", ack),
        api_route("jobs/progress", "jobs/progress", progress),
        api_route("jobs/fail", "jobs/fail", fail),
    ]
