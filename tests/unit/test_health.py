"""The probe/metrics ASGI app, driven directly with scope/receive/send (no server)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aitbc_miner import __version__
from aitbc_miner.health import make_app
from aitbc_miner.metrics import Metrics


class Status:
    def __init__(self, **snap: Any) -> None:
        self.snap = snap
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return dict(self.snap)


async def request(app: Any, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [],
    }
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    start, body = sent
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    if method == "HEAD":
        assert body["body"] == b"", "HEAD must not carry a body"
    else:
        assert int(headers["content-length"]) == len(body["body"])
    return start["status"], headers, body["body"]


READY = {"alive": True, "ready": True, "registered": True, "node_id": "n1", "running_jobs": 2}


async def test_healthz_200_json() -> None:
    status = Status(**READY)
    code, headers, body = await request(make_app(status, None), "/healthz")
    assert code == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert json.loads(body) == READY
    assert status.calls == 1


async def test_healthz_503_when_stuck() -> None:
    code, _, body = await request(make_app(Status(alive=False, reason="loop stuck"), None),
                                  "/healthz")  # fmt: skip
    assert code == 503
    assert json.loads(body)["reason"] == "loop stuck"


async def test_healthz_serialises_non_json_values() -> None:
    from datetime import UTC, datetime

    snap = Status(alive=True, last_heartbeat=datetime(2025, 1, 1, tzinfo=UTC))
    code, _, body = await request(make_app(snap, None), "/healthz")
    assert code == 200
    assert json.loads(body)["last_heartbeat"].startswith("2025-01-01")


@pytest.mark.parametrize(
    ("snap", "expected"),
    [
        (READY, 200),
        ({**READY, "ready": False}, 503),
        ({"alive": True}, 503),
        ({**READY, "ready": None}, 503),
    ],
)
async def test_readyz_follows_ready(snap: dict[str, Any], expected: int) -> None:
    code, headers, body = await request(make_app(Status(**snap), None), "/readyz")
    assert code == expected
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == snap


async def test_readyz_reads_a_fresh_snapshot_each_time() -> None:
    status = Status(ready=False)
    app = make_app(status, None)
    assert (await request(app, "/readyz"))[0] == 503
    status.snap["ready"] = True
    assert (await request(app, "/readyz"))[0] == 200


async def test_metrics_exposes_build_info() -> None:
    metrics = Metrics()
    metrics.jobs.labels(outcome="done", code="", runner="cli").inc()
    code, headers, body = await request(make_app(Status(), metrics.registry), "/metrics")
    assert code == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert f'aitbc_miner_build_info{{version="{__version__}"}} 1.0' in text
    assert 'aitbc_miner_jobs_total{code="",outcome="done",runner="cli"} 1.0' in text


async def test_metrics_404_without_registry() -> None:
    code, _, _ = await request(make_app(Status(), None), "/metrics")
    assert code == 404


@pytest.mark.parametrize("path", ["/", "/health", "/healthz/extra", "/admin", "/metricsx"])
async def test_unknown_path_404(path: str) -> None:
    status = Status(**READY)
    code, _, body = await request(make_app(status, Metrics().registry), path)
    assert code == 404
    assert json.loads(body) == {"error": "not found"}
    assert status.calls == 0


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/nope"])
async def test_mutating_methods_405(method: str, path: str) -> None:
    status = Status(**READY)
    code, _, body = await request(make_app(status, Metrics().registry), path, method)
    assert code == 405
    assert json.loads(body) == {"error": "method not allowed"}
    assert status.calls == 0  # refused before the agent is asked anything


async def test_head_is_allowed() -> None:
    code, headers, body = await request(make_app(Status(**READY), None), "/readyz", "HEAD")
    assert code == 200
    assert body == b"" and int(headers["content-length"]) > 0


async def test_lifespan_startup_and_shutdown() -> None:
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    app = make_app(Status(), None)
    await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert incoming == []


async def test_unknown_scope_type_sends_nothing() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        raise AssertionError("must not read")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await make_app(Status(), None)({"type": "websocket", "path": "/healthz"}, receive, send)
    assert sent == []
