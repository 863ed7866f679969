"""The probe and metrics endpoints: /healthz, /readyz, /metrics (ASGI).

I/O: served by hypercorn's trio worker on `health.listen`. The app only reads
a status snapshot from the agent; it never changes daemon state.

- /healthz: liveness. Answering at all proves the event loop runs; 200 with
  the status JSON unless the agent reports itself stuck (then 503).
- /readyz: 200 when registered, active, not draining and the last heartbeat
  succeeded recently; 503 otherwise (same JSON body).
- /metrics: Prometheus text exposition of the daemon's registry.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

StatusFn = Callable[[], dict[str, Any]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def make_app(
    status: StatusFn, registry: CollectorRegistry | None
) -> Callable[..., Awaitable[None]]:
    async def app(
        scope: dict[str, Any], receive: Callable[..., Awaitable[Any]], send: Send
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            status_code, body, ctype = 405, b'{"error":"method not allowed"}', "application/json"
        elif path == "/healthz":
            snap = status()
            status_code = 200 if snap.get("alive", True) else 503
            body, ctype = _json(snap), "application/json"
        elif path == "/readyz":
            snap = status()
            status_code, body, ctype = (
                (200 if snap.get("ready") else 503),
                _json(snap),
                "application/json",
            )
        elif path == "/metrics" and registry is not None:
            status_code, body, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
        else:
            status_code, body, ctype = 404, b'{"error":"not found"}', "application/json"
        await _reply(send, status_code, body, ctype, head=head)

    return app


def _json(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, default=str).encode()


async def _reply(
    send: Send, status: int, body: bytes, content_type: str, *, head: bool = False
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


async def serve_health(
    listen: str,
    status: StatusFn,
    registry: CollectorRegistry | None,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `started()` with the bound URLs once listening."""
    config = HypercornConfig()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    await serve(make_app(status, registry), config, task_status=task_status)  # type: ignore[arg-type]
