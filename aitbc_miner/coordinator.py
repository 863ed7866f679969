"""Typed async client for the coordinator API (PROTOCOL.md), on httpx under trio.

I/O: network. Owns the retry policy of the contract: bearer auth, an
Idempotency-Key reused across retries of one logical request, exponential
backoff with full jitter, Retry-After, 401 → re-register then retry, and the
403 / 404-409-410 / other-4xx meanings. httpx exceptions never leave this
module: they become CoordinatorError subclasses (STYLE rule 7).
"""

from __future__ import annotations

import email.utils
import json
import random
import ssl
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import structlog
import trio
from pydantic import BaseModel, ValidationError

from . import __version__
from .backoff import Backoff
from .errors import CoordinatorUnavailable, JobGone, NodeRejected, RequestRejected
from .logs import register_secret
from .manifest import (
    HeartbeatReply,
    ProgressReply,
    PullReply,
    RegisterReply,
    UploadStarted,
    UploadStatus,
)
from .metrics import Metrics

log = structlog.get_logger(__name__)
R = TypeVar("R", bound=BaseModel)

RETRYABLE_STATUS = frozenset({408, 425, 429}) | frozenset(range(500, 600))
JOB_GONE_STATUS = frozenset({404, 409, 410})
# A request body builder: returns httpx request kwargs (json=..., or files=/data=
# for multipart). Called once per attempt so file objects are fresh each time;
# files it opens are registered on the ExitStack and closed after the attempt.
BodyFactory = Callable[[ExitStack], dict[str, Any]]


class _Retry(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True, int("²") fails
        return float(min(int(value), 86_400))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.now(UTC).timestamp() if now is None else now
    return max(0.0, when.timestamp() - current)


def describe_transport_error(exc: BaseException) -> str:
    """`Type: message`, plus the TLS reason that httpx/trio bury in the cause chain
    (a failed handshake surfaces as a bare `ConnectError: ` otherwise)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    seen: set[int] = set()
    inner: BaseException | None = exc
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        if isinstance(inner, ssl.SSLError):
            return f"{text} (TLS: {inner})"
        inner = inner.__cause__ or inner.__context__
    return text


def ssl_context(tls_verify: bool | str) -> ssl.SSLContext | bool:
    """A pinned CA bundle (path), the operating system's trust store (True), or False.

    True means the OS store (Debian: /etc/ssl/certs, what `update-ca-certificates`
    maintains), not httpx's bundled certifi list, so an operator's own CA works.
    """
    if isinstance(tls_verify, str):
        return ssl.create_default_context(cafile=tls_verify)
    if tls_verify:
        return ssl.create_default_context()
    return False


class CoordinatorClient:
    """One per daemon. Holds the node token in memory only."""

    def __init__(
        self,
        *,
        base_url: str,
        bootstrap_token: str,
        node_id: str,
        timeout_s: float = 20.0,
        tls_verify: bool | str = True,
        backoff_min_s: float = 5.0,
        backoff_max_s: float = 120.0,
        max_response_bytes: int = 1 << 20,
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        descriptor: Callable[[], dict[str, Any]] | None = None,
        on_register: Callable[[RegisterReply], None] | None = None,
    ) -> None:
        self.node_id = node_id
        self._bootstrap_token = bootstrap_token
        register_secret(bootstrap_token)
        self._node_token: str | None = None
        self._token_generation = 0
        self._timeout_s = timeout_s
        self._backoff_min = backoff_min_s
        self._backoff_max = backoff_max_s
        self._max_body = max_response_bytes
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._descriptor = descriptor or (lambda: {"node_id": node_id})
        self._on_register = on_register
        self._register_lock = trio.Lock()
        self.token_expires_at: float | None = None
        self.token_issued_at: float | None = None
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            timeout=timeout_s,
            verify=ssl_context(tls_verify) if transport is None else True,
            transport=transport,
            headers={"User-Agent": f"aitbc-miner/{__version__}"},
            follow_redirects=False,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    @property
    def registered(self) -> bool:
        return self._node_token is not None

    # -- node endpoints --------------------------------------------------------------

    async def register(self, *, retry: bool = True) -> RegisterReply:
        """Exchange the bootstrap token for a node token (retrying until it works)."""
        async with self._register_lock:
            return await self._register_locked(retry=retry)

    async def _register_locked(self, *, retry: bool) -> RegisterReply:
        reply = await self._call(
            "nodes/register",
            lambda _: {"json": self._descriptor()},
            RegisterReply,
            retry=retry,
            token=self._bootstrap_token,
            reauth=False,
        )
        self._node_token = reply.node_token
        register_secret(reply.node_token)
        self._token_generation += 1
        self.token_expires_at = _parse_time(reply.expires_at)
        self.token_issued_at = time.time()
        if self._on_register is not None:
            self._on_register(reply)
        return reply

    async def heartbeat(self, body: dict[str, Any]) -> HeartbeatReply:
        """One attempt (the heartbeat loop owns its own backoff)."""
        return await self._call("nodes/heartbeat", _json(body), HeartbeatReply, retry=False)

    async def deregister(self) -> None:
        await self._call("nodes/deregister", _json({"node_id": self.node_id}), None, retry=False)

    # -- job endpoints ---------------------------------------------------------------

    async def pull(self, filters: dict[str, Any], wait_s: float) -> PullReply:
        body = {"node_id": self.node_id, "filters": filters, "wait_s": wait_s}
        return await self._call(
            "jobs/pull", _json(body), PullReply, retry=True, timeout=self._timeout_s + wait_s
        )

    async def ack(self, job_id: str, lease_id: str, attempt: int) -> None:
        body = {"job_id": job_id, "node_id": self.node_id, "lease_id": lease_id, "attempt": attempt}
        await self._call("jobs/ack", _json(body), None, retry=True, job_endpoint=True)

    async def progress(self, job_id: str, attempt: int, pct: int, note: str) -> ProgressReply:
        body = {
            "job_id": job_id,
            "node_id": self.node_id,
            "attempt": attempt,
            "pct": pct,
            "note": note,
        }
        return await self._call(
            "jobs/progress", _json(body), ProgressReply, retry=False, job_endpoint=True
        )

    async def result(self, build: BodyFactory, *, idempotency_key: str) -> dict[str, Any]:
        """Send the multipart result; `build` makes the body afresh for each attempt."""
        return await self._call(
            "jobs/result", build, None, retry=True, job_endpoint=True, key=idempotency_key
        )

    async def fail(self, body: dict[str, Any], *, idempotency_key: str) -> None:
        await self._call(
            "jobs/fail", _json(body), None, retry=True, job_endpoint=True, key=idempotency_key
        )

    async def upload_start(
        self, job_id: str, body: dict[str, Any], *, idempotency_key: str | None = None
    ) -> UploadStarted:
        return await self._call(
            f"jobs/{job_id}/uploads",
            _json(body),
            UploadStarted,
            retry=True,
            job_endpoint=True,
            key=idempotency_key,
            endpoint="jobs/uploads",
        )

    async def upload_put(
        self, upload_id: str, content: bytes, first: int, size: int
    ) -> tuple[int, bool]:
        """PUT one chunk; returns (received, accepted). A 416 is (received, False)."""
        last = first + len(content) - 1
        reply = await self._call(
            f"uploads/{upload_id}",
            lambda _: {"content": content},
            UploadStatus,
            retry=True,
            job_endpoint=True,
            method="PUT",
            endpoint="uploads/put",
            headers={"Content-Range": f"bytes {first}-{last}/{size}"},
            accept_status=(416,),
        )
        return reply.received, reply.received >= first + len(content)

    async def upload_status(self, upload_id: str) -> UploadStatus:
        return await self._call(
            f"uploads/{upload_id}",
            None,
            UploadStatus,
            retry=True,
            job_endpoint=True,
            method="GET",
            endpoint="uploads/status",
        )

    # -- the one request path ----------------------------------------------------------

    async def _call(
        self,
        path: str,
        body: BodyFactory | None,
        model: type[R] | None,
        *,
        retry: bool,
        job_endpoint: bool = False,
        key: str | None = None,
        token: str | None = None,
        reauth: bool = True,
        timeout: float | None = None,
        method: str = "POST",
        endpoint: str | None = None,
        headers: dict[str, str] | None = None,
        accept_status: tuple[int, ...] = (),
    ) -> Any:
        endpoint = endpoint or path
        key = key or str(uuid.uuid4())
        backoff = Backoff(self._backoff_min, self._backoff_max, self._rng)
        unauthorized = 0
        while True:
            generation = self._token_generation
            try:
                return await self._attempt(
                    method,
                    path,
                    body,
                    model,
                    endpoint=endpoint,
                    key=key,
                    token=token if token is not None else self._node_token,
                    timeout=timeout,
                    headers=headers,
                    job_endpoint=job_endpoint,
                    accept_status=accept_status,
                )
            except _Unauthorized:
                if not reauth:
                    if not retry:
                        raise RequestRejected(
                            f"{endpoint}: 401 bootstrap token refused", status=401
                        ) from None
                    delay = backoff.next()
                    log.error(
                        "register_unauthorized", endpoint=endpoint, retry_in_s=round(delay, 2)
                    )
                    await trio.sleep(delay)
                    continue
                unauthorized += 1
                if unauthorized > 1:
                    # A fresh token was refused again: do not spin register → 401.
                    delay = backoff.next()
                    log.warning(
                        "token_refused_again", endpoint=endpoint, retry_in_s=round(delay, 2)
                    )
                    await trio.sleep(delay)
                await self._reauthenticate(generation)
                continue  # the same logical request, the same Idempotency-Key
            except _Retry as exc:
                if not retry:
                    raise CoordinatorUnavailable(
                        f"{endpoint}: {exc.reason}", retry_after=exc.retry_after
                    ) from None
                delay = backoff.next(exc.retry_after)
                log.warning(
                    "coordinator_retry",
                    endpoint=endpoint,
                    reason=exc.reason,
                    attempt=backoff.attempt,
                    retry_in_s=round(delay, 2),
                )
                await trio.sleep(delay)

    async def _reauthenticate(self, seen_generation: int) -> None:
        async with self._register_lock:
            if self._token_generation != seen_generation:
                return  # another task already re-registered
            log.warning("node_token_rejected", action="re-register")
            await self._register_locked(retry=True)

    async def _attempt(
        self,
        method: str,
        path: str,
        body: BodyFactory | None,
        model: type[R] | None,
        *,
        endpoint: str,
        key: str,
        token: str | None,
        timeout: float | None,
        headers: dict[str, str] | None,
        job_endpoint: bool,
        accept_status: tuple[int, ...],
    ) -> Any:
        if token is None:
            raise _Unauthorized()
        hdrs = {"Authorization": f"Bearer {token}"}
        if method != "GET":
            hdrs["Idempotency-Key"] = key
        if headers:
            hdrs.update(headers)
        with ExitStack() as stack:
            kwargs = body(stack) if body is not None else {}
            try:
                request = self._http.build_request(
                    method, path, headers=hdrs, timeout=timeout or self._timeout_s, **kwargs
                )
                response = await self._http.send(request, stream=True)
            except httpx.HTTPError as exc:
                self._count(endpoint, "error")
                raise _Retry(describe_transport_error(exc)) from None
            try:
                raw = await self._read_capped(response)
            except httpx.HTTPError as exc:
                self._count(endpoint, "error")
                raise _Retry(f"reading reply: {describe_transport_error(exc)}") from None
            finally:
                await response.aclose()
        status = response.status_code
        self._count(endpoint, str(status))
        if 200 <= status < 300 or status in accept_status:
            return _parse(endpoint, raw, model)
        text = raw[:1024].decode("utf-8", "replace")
        if status == 401:
            raise _Unauthorized()
        if status == 403:
            raise NodeRejected(f"{endpoint}: 403 node rejected: {text}")
        if job_endpoint and status in JOB_GONE_STATUS:
            raise JobGone(f"{endpoint}: {status} job no longer ours: {text}", status=status)
        if status in RETRYABLE_STATUS:
            raise _Retry(f"HTTP {status}", parse_retry_after(response.headers.get("Retry-After")))
        log.error("coordinator_rejected", endpoint=endpoint, status=status, body=text)
        raise RequestRejected(f"{endpoint}: HTTP {status}: {text}", status=status, body=text)

    async def _read_capped(self, response: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.aiter_bytes():
            total += len(chunk)
            if total > self._max_body:
                raise _Retry(f"reply body larger than {self._max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _count(self, endpoint: str, code: str) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(endpoint=endpoint, code=code).inc()


def token_renewal_due(
    now: float, issued: float | None, expires: float | None, heartbeat_s: float
) -> bool:
    """Pure: renew the node token now? Two heartbeats (+5 s) before it expires, but
    never earlier than half its lifetime, so a short-lived token is not renewed on
    every heartbeat."""
    if expires is None:
        return False
    margin = 2 * heartbeat_s + 5
    if issued is not None and expires > issued:
        margin = min(margin, (expires - issued) / 2)
    return expires - now < margin


class _Unauthorized(Exception):
    pass


def _json(body: dict[str, Any]) -> BodyFactory:
    return lambda _: {"json": body}


def _parse(endpoint: str, raw: bytes, model: type[R] | None) -> Any:
    if model is None:
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            return {}  # the contract gives these replies no meaning beyond the status
        return data if isinstance(data, dict) else {}
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        snippet = raw[:200].decode("utf-8", "replace")
        raise _Retry(
            f"malformed {endpoint} reply ({exc.error_count()} errors): {snippet!r}"
        ) from None


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()
