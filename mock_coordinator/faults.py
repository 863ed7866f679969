"""Fault injection for the mock: fault specs, seeded per-request decisions, and the ASGI
middleware that applies them to /api/v1 and /files (never /admin)."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any

import trio

API_PREFIX = "/api/v1/"
Send = Callable[[dict[str, Any]], Any]


def endpoint_of(method: str, path: str) -> str | None:
    """Stable endpoint name of a request, or None for paths faults never touch."""
    if path.startswith("/files/"):
        return "files"
    if not path.startswith(API_PREFIX):
        return None
    parts = path[len(API_PREFIX) :].strip("/").split("/")
    if len(parts) == 3 and parts[0] == "jobs" and parts[2] == "uploads":
        return "jobs/uploads"
    if len(parts) == 2 and parts[0] == "uploads":
        return "uploads/put" if method == "PUT" else "uploads/get"
    return "/".join(parts)


@dataclasses.dataclass
class Fault:
    id: int
    endpoint: str = "*"
    error_rate: float = 0.0
    status: int = 503
    retry_after: float | str | None = None
    latency_ms: tuple[float, float] | None = None
    drop_rate: float = 0.0
    drop_after: bool = False
    times: int | None = None  # remaining matches; None = unlimited
    matched: int = 0
    fired: int = 0

    @property
    def active(self) -> bool:
        return self.times is None or self.times > 0


def _rate(spec: dict[str, Any], name: str) -> float:
    value = spec.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1]")
    return float(value)


def parse_fault(spec: Any, fault_id: int) -> Fault:
    """Validate an admin fault spec; ValueError says what is wrong."""
    if not isinstance(spec, dict):
        raise ValueError("fault spec must be a JSON object")
    known = {
        "endpoint",
        "error_rate",
        "status",
        "retry_after",
        "latency_ms",
        "drop_rate",
        "drop_after",
        "times",
    }
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"unknown fault fields: {sorted(unknown)}")
    endpoint = spec.get("endpoint", "*")
    status = spec.get("status", 503)
    retry_after = spec.get("retry_after")
    latency = spec.get("latency_ms")
    drop_after = spec.get("drop_after", False)
    times = spec.get("times")
    if not isinstance(endpoint, str) or not endpoint:
        raise ValueError("endpoint must be a non-empty string")
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status code")
    if retry_after is not None and (
        isinstance(retry_after, bool) or not isinstance(retry_after, int | float | str)
    ):
        raise ValueError("retry_after must be null, seconds, or an HTTP-date string")
    if latency is not None:
        ok = (
            isinstance(latency, list)
            and len(latency) == 2
            and all(
                isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in latency
            )
            and latency[0] <= latency[1]
        )
        if not ok:
            raise ValueError("latency_ms must be [min, max] with 0 <= min <= max")
        latency = (float(latency[0]), float(latency[1]))
    if not isinstance(drop_after, bool):
        raise ValueError("drop_after must be a boolean")
    if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 0):
        raise ValueError("times must be null or a non-negative integer")
    return Fault(
        id=fault_id,
        endpoint=endpoint,
        error_rate=_rate(spec, "error_rate"),
        status=status,
        retry_after=retry_after,
        latency_ms=latency,
        drop_rate=_rate(spec, "drop_rate"),
        drop_after=drop_after,
        times=times,
    )


@dataclasses.dataclass
class Decision:
    latency_s: float = 0.0
    error: Fault | None = None
    drop: str | None = None  # "before" or "after" processing


class FaultTable:
    """The active faults and the seeded RNG that rolls them."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.faults: list[Fault] = []
        self._next_id = 1

    def add(self, spec: Any) -> Fault:
        fault = parse_fault(spec, self._next_id)
        self._next_id += 1
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()

    def describe(self) -> list[dict[str, Any]]:
        return [dataclasses.asdict(f) | {"active": f.active} for f in self.faults]

    def decide(self, endpoint: str) -> Decision:
        """Roll every active fault matching `endpoint`; the first error or drop wins."""
        decision = Decision()
        for fault in self.faults:
            if not fault.active or not fnmatchcase(endpoint, fault.endpoint):
                continue
            fault.matched += 1
            if fault.times is not None:
                fault.times -= 1
            if fault.latency_ms is not None:
                decision.latency_s += self.rng.uniform(*fault.latency_ms) / 1000
            if decision.error is not None or decision.drop is not None:
                continue
            if fault.error_rate and self.rng.random() < fault.error_rate:
                decision.error = fault
                fault.fired += 1
            elif fault.drop_rate and self.rng.random() < fault.drop_rate:
                decision.drop = "after" if fault.drop_after else "before"
                fault.fired += 1
        return decision


async def _drain(receive: Callable[[], Any]) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _send_truncated(send: Send, start: dict[str, Any] | None, body: bytes) -> None:
    """Start a response that promises more bytes than it sends; returning without
    finishing it makes hypercorn close the connection mid-body."""
    if start is None or not body:
        start = {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
        body = b'{"dropped": "by the mock coordinator"}'
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})


class FaultMiddleware:
    """ASGI wrapper: latency, injected error answers and dropped connections."""

    def __init__(self, app: Any, table: FaultTable, count: Callable[[str], None]) -> None:
        self.app = app
        self.table = table
        self.count = count

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        endpoint = endpoint_of(scope.get("method", ""), scope.get("path", ""))
        if scope["type"] != "http" or endpoint is None:
            await self.app(scope, receive, send)
            return
        decision = self.table.decide(endpoint)
        if decision.latency_s:
            self.count("latency")
            await trio.sleep(decision.latency_s)
        if decision.error is not None:
            self.count("error")
            await _drain(receive)
            fault = decision.error
            body = json.dumps({"error": "injected fault", "fault_id": fault.id}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
            if fault.retry_after is not None:
                value = fault.retry_after
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                headers.append((b"retry-after", str(value).encode()))
            await send({"type": "http.response.start", "status": fault.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        if decision.drop == "before":
            self.count("drop")
            await _send_truncated(send, None, b"")
            return
        if decision.drop == "after":
            self.count("drop_after")
            captured: list[dict[str, Any]] = []

            async def capture(message: dict[str, Any]) -> None:
                captured.append(message)

            await self.app(scope, receive, capture)
            start = next((m for m in captured if m["type"] == "http.response.start"), None)
            body = b"".join(
                m.get("body", b"") for m in captured if m["type"] == "http.response.body"
            )
            await _send_truncated(send, start, body)
            return
        await self.app(scope, receive, send)
