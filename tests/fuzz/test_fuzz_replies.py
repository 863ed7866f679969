"""Fuzz every coordinator reply shape through the real CoordinatorClient.

A handler (httpx.MockTransport) answers one call with a hostile reply (any status,
content type, Retry-After, a body of wrong types, missing fields, invalid JSON,
random bytes, 10 MB, or an endless stream) and sane replies afterwards, so calls that
retry terminate. Time is trio's MockClock, so backoff costs nothing.
Property: the call returns its typed reply or raises a CoordinatorError subclass;
nothing else escapes, a body above max_response_bytes is never parsed, an endless
body is cut off at the cap.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import httpx
import trio
import trio.testing
from hypothesis import event, given
from hypothesis import strategies as st
from pydantic import BaseModel

from aitbc_miner.coordinator import CoordinatorClient, parse_retry_after
from aitbc_miner.errors import CoordinatorError
from mock_coordinator.transfer import RANGE_RE
from tests.fuzz.profile import budget, seen
from tests.fuzz.strategies import json_values, manifests, text

CAP = 64 * 1024  # max_response_bytes of the client under test
BIG = b'{"job": null, "pad": "' + b"x" * (10 * 1024 * 1024) + b'"}'  # valid JSON, 10 MB

CALLS: dict[str, tuple[str, Callable[[CoordinatorClient], Awaitable[Any]]]] = {
    "register": ("nodes/register", lambda c: c.register(retry=False)),
    "register-retry": ("nodes/register", lambda c: c.register(retry=True)),
    "heartbeat": ("nodes/heartbeat", lambda c: c.heartbeat({"node_id": "n1", "seq": 1})),
    "deregister": ("nodes/deregister", lambda c: c.deregister()),
    "pull": ("jobs/pull", lambda c: c.pull({"runners": ["cli"]}, 0)),
    "ack": ("jobs/ack", lambda c: c.ack("j1", "l1", 1)),
    "progress": ("jobs/progress", lambda c: c.progress("j1", 1, 50, "half")),
    "result": ("jobs/result", lambda c: c.result(
        lambda _: {"files": [("metadata", (None, "{}", "application/json"))]},
        idempotency_key="k1")),
    "fail": ("jobs/fail", lambda c: c.fail({"job_id": "j1"}, idempotency_key="k2")),
    "upload_start": ("jobs/j1/uploads", lambda c: c.upload_start("j1", {"path": "a"})),
    "upload_put": ("uploads/u1", lambda c: c.upload_put("u1", b"abcd", 0, 8)),
    "upload_status": ("uploads/u1", lambda c: c.upload_status("u1")),
}  # fmt: skip

SANE: dict[str, Any] = {
    "nodes/register": {"node_token": "tok", "expires_at": None, "status": "active"},
    "nodes/heartbeat": {"status": "active", "cancel": []},
    "jobs/pull": {"job": None, "lease": None, "signature": None},
    "jobs/progress": {"cancel": False},
    "jobs/j1/uploads": {"upload_id": "u1", "chunk_size": 4, "received": 0},
    "uploads/u1": {"received": 4, "size": 8, "complete": False},
}

# Field names the reply models know, to build near-miss shapes with wrong types.
FIELDS = ["node_token", "expires_at", "status", "heartbeat_interval_s", "cancel", "job",
          "lease", "lease_id", "signature", "key_id", "alg", "value", "upload_id",
          "chunk_size", "received", "size", "complete", "duplicate"]  # fmt: skip
near_miss = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
shaped = st.one_of(
    near_miss,
    st.fixed_dictionaries(
        {"job": st.one_of(manifests, json_values)},
        optional={
            "lease": st.one_of(st.fixed_dictionaries({"lease_id": json_values}), json_values),
            "signature": st.one_of(
                st.fixed_dictionaries({"key_id": text, "alg": text, "value": text}), json_values
            ),
        },
    ),
    st.fixed_dictionaries(
        {"node_token": st.one_of(text, json_values)},
        optional={
            "expires_at": st.one_of(
                st.sampled_from(["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59",
                                 "2025-13-40T99:99:99Z", "nan", ""]),
                st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
                text,
            ),
            "status": st.one_of(st.sampled_from(["active", "pending", "banned"]), json_values),
            "heartbeat_interval_s": json_values,
        },
    ),
)  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["json", "shaped", "bytes", "text", "empty", "big", "endless",
                                 "deep", "nan"]))  # fmt: skip
    if kind == "json":
        return kind, json.dumps(draw(json_values)).encode()
    if kind == "shaped":
        return kind, json.dumps(draw(shaped)).encode()
    if kind == "bytes":
        return kind, draw(st.binary(max_size=300))
    if kind == "text":
        return kind, draw(text).encode("utf-8")
    if kind == "empty":
        return kind, b""
    if kind == "deep":
        depth = draw(st.integers(100, 5000))
        return kind, b'{"job": ' + b"[" * depth + b"]" * depth + b"}"
    if kind == "nan":
        return kind, b'{"job": {"job_id": "j", "x": NaN, "y": -Infinity}, "received": 1e999}'
    return kind, BIG if kind == "big" else None  # None: an endless stream


RETRY_AFTER = st.one_of(
    st.none(),
    st.integers(-5, 10**12).map(str),
    text,
    st.sampled_from(["Fri, 31 Dec 9999 23:59:59 GMT", "Mon, 01 Jan 0001 00:00:00 GMT",
                     "Wed, 21 Oct 2015 07:28:00 GMT", "²", "1e3", " 7 ", "-1", "0x10"]),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                 timezones=st.just(UTC)).map(lambda d: format_datetime(d, usegmt=True)),
)  # fmt: skip
STATUSES = st.one_of(
    st.sampled_from([200, 201, 204, 301, 302, 400, 401, 403, 404, 408, 409, 410, 413, 416,
                     422, 425, 429, 500, 502, 503, 504, 599]),
    st.integers(100, 599),
)  # fmt: skip
CONTENT_TYPES = st.sampled_from(
    ["application/json", "text/html", "application/octet-stream", "",
     "application/json; charset=latin-1", "multipart/form-data; boundary=x", "\x00"]
)  # fmt: skip


@budget(weight=2.0)
@given(
    call=st.sampled_from(sorted(CALLS)),
    status=STATUSES,
    content_type=CONTENT_TYPES,
    retry_after=RETRY_AFTER,
    body=bodies(),
    seed=st.integers(0, 2**32),
)
def test_only_coordinator_errors_escape_the_client(
    call: str, status: int, content_type: str, retry_after: str | None,
    body: tuple[str, bytes | None], seed: int,
) -> None:  # fmt: skip
    seen("coordinator-reply")
    kind, payload = body
    target, invoke = CALLS[call]
    answered: list[int] = []
    streamed = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal streamed
        while True:
            streamed += 16 * 1024
            yield b" " * (16 * 1024)

    def handler(request: httpx.Request) -> httpx.Response:
        endpoint = request.url.path.removeprefix("/api/v1/")
        if endpoint == target and not answered:
            answered.append(status)
            # Raw header bytes, as a server may send them (obs-text included).
            headers: dict[bytes, bytes] = {}
            if content_type.isprintable():
                headers[b"Content-Type"] = content_type.encode()
            if retry_after is not None and retry_after.isprintable():
                headers[b"Retry-After"] = (retry_after.strip() or "0").encode()
            content: Any = endless() if payload is None else payload
            return httpx.Response(status, headers=headers, content=content)
        answered.append(0)
        return httpx.Response(200, json=SANE.get(endpoint, {}))

    async def main() -> Any:
        client = CoordinatorClient(
            base_url="http://coord.test/api/v1",
            bootstrap_token="boot",
            node_id="n1",
            transport=httpx.MockTransport(handler),
            backoff_min_s=0.5,
            backoff_max_s=4,
            max_response_bytes=CAP,
            rng=random.Random(seed),
        )
        try:
            if call != "register" and call != "register-retry":
                await client.register(retry=False)  # sane: the script starts after it
            return await invoke(client)
        finally:
            await client.aclose()

    try:
        reply = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    except CoordinatorError as exc:
        event(f"{type(exc).__name__}")
        reply = None
    else:
        event("returned")
        assert reply is None or isinstance(reply, BaseModel | dict | tuple)
    if kind in ("big", "endless") and 200 <= status < 300:
        # Never parsed: the first answer was refused (and retried or reported).
        assert reply is None or len(answered) > 1, (call, status, answered)
    if kind == "endless":
        assert streamed <= CAP + 32 * 1024, streamed
    assert len(answered) <= 8, answered


@budget(weight=2.0)
@given(value=st.one_of(RETRY_AFTER, st.text(max_size=60)), now=st.floats(0, 4e9))
def test_retry_after_is_none_or_a_bounded_delay(value: str | None, now: float) -> None:
    seen("retry-after")
    delay = parse_retry_after(value, now=now)
    assert delay is None or (0.0 <= delay and delay == delay)
    if value is not None and value.strip().isascii() and value.strip().isdigit():
        assert delay is not None and delay <= 86_400


@budget(weight=1.0)
@given(
    first=st.integers(0, 2**53),
    length=st.integers(1, 64),
    extra=st.integers(0, 2**53),
)
def test_content_range_the_miner_sends_is_what_the_coordinator_parses(
    first: int, length: int, extra: int
) -> None:
    seen("content-range")
    size = first + length + extra
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            sent.append(request.headers["content-range"])
            return httpx.Response(200, json={"received": first + length})
        return httpx.Response(200, json=SANE["nodes/register"])

    async def main() -> tuple[int, bool]:
        client = CoordinatorClient(
            base_url="http://coord.test/api/v1",
            bootstrap_token="b",
            node_id="n1",
            transport=httpx.MockTransport(handler),
        )
        try:
            await client.register(retry=False)
            return await client.upload_put("u1", b"x" * length, first, size)
        finally:
            await client.aclose()

    received, accepted = trio.run(main)
    assert accepted and received == first + length
    match = RANGE_RE.match(sent[0].strip())
    assert match is not None, sent
    assert tuple(int(g) for g in match.groups()) == (first, first + length - 1, size)


@budget(weight=1.0)
@given(header=st.one_of(
    st.text(max_size=40),
    st.from_regex(r"bytes \d{1,30}-\d{1,30}/\d{1,30}", fullmatch=True),
    st.builds("bytes {}-{}/{}".format, st.integers(-5, 99), st.integers(-5, 99),
              st.integers(-5, 99)),
))  # fmt: skip
def test_content_range_parser_yields_only_non_negative_ints(header: str) -> None:
    seen("content-range")
    match = RANGE_RE.match(header.strip())
    if match is None:
        return
    first, last, total = (int(g) for g in match.groups())
    assert min(first, last, total) >= 0
