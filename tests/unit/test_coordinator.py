"""CoordinatorClient against an httpx.MockTransport fake that records every request.

Time is trio's MockClock with autojump (the `autojump_clock` fixture), so backoff
sleeps cost nothing and `trio.current_time()` measures exactly what was slept.
"""

from __future__ import annotations

import itertools
import json
import random
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest
import trio

from aitbc_miner import __version__
from aitbc_miner.coordinator import CoordinatorClient, parse_retry_after, token_renewal_due
from aitbc_miner.errors import CoordinatorUnavailable, JobGone, NodeRejected, RequestRejected
from aitbc_miner.manifest import RegisterReply
from aitbc_miner.metrics import Metrics

BASE = "http://coord.test/api/v1"
Reply = httpx.Response | Callable[[httpx.Request], Any]


@dataclass
class Call:
    endpoint: str
    method: str
    headers: httpx.Headers
    body: bytes
    at: float

    @property
    def token(self) -> str:
        return self.headers["authorization"].removeprefix("Bearer ")

    @property
    def key(self) -> str | None:
        return self.headers.get("idempotency-key")

    def json(self) -> Any:
        return json.loads(self.body)


class FakeCoordinator:
    """Scripted replies per endpoint; a sensible 200 once the script runs out."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.script: dict[str, list[Reply]] = defaultdict(list)
        self.tokens_issued = 0

    def push(self, endpoint: str, *replies: Reply) -> None:
        self.script[endpoint].extend(replies)

    def to(self, endpoint: str) -> list[Call]:
        return [c for c in self.calls if c.endpoint == endpoint]

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        endpoint = request.url.path.removeprefix("/api/v1/")
        self.calls.append(
            Call(endpoint, request.method, request.headers, request.content, trio.current_time())
        )
        if self.script[endpoint]:
            reply = self.script[endpoint].pop(0)
            if callable(reply):
                reply = reply(request)
                if isinstance(reply, Awaitable):
                    reply = await reply
            assert isinstance(reply, httpx.Response)
            return reply
        return self.default(endpoint)

    def default(self, endpoint: str) -> httpx.Response:
        if endpoint == "nodes/register":
            self.tokens_issued += 1
            return httpx.Response(200, json={"node_token": f"node-token-{self.tokens_issued}",
                                             "status": "active"})  # fmt: skip
        if endpoint == "nodes/heartbeat":
            return httpx.Response(200, json={"status": "active", "cancel": []})
        if endpoint == "jobs/pull":
            return httpx.Response(200, json={"job": None, "lease": None, "signature": None})
        if endpoint == "jobs/progress":
            return httpx.Response(200, json={"cancel": False})
        if endpoint.startswith("jobs/") and endpoint.endswith("/uploads"):
            return httpx.Response(200, json={"upload_id": "u1", "chunk_size": 4, "received": 0})
        if endpoint.startswith("uploads/"):
            return httpx.Response(200, json={"received": 4, "size": 8, "complete": False})
        return httpx.Response(200, json={})


def status(code: int, **kw: Any) -> httpx.Response:
    return httpx.Response(code, **kw)


def raise_(exc_type: type[httpx.TransportError]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("simulated", request=request)

    return handler


MakeClient = Callable[..., CoordinatorClient]


@pytest.fixture
def fake() -> FakeCoordinator:
    return FakeCoordinator()


@pytest.fixture
async def make_client(fake: FakeCoordinator) -> AsyncIterator[MakeClient]:
    clients: list[CoordinatorClient] = []

    def make(**overrides: Any) -> CoordinatorClient:
        params: dict[str, Any] = {
            "base_url": BASE,
            "bootstrap_token": "boot-secret",
            "node_id": "n1",
            "transport": httpx.MockTransport(fake),
            "backoff_min_s": 1,
            "backoff_max_s": 8,
            "rng": random.Random(1),
        }
        params.update(overrides)
        client = CoordinatorClient(**params)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
async def client(make_client: MakeClient) -> CoordinatorClient:
    c = make_client()
    await c.register()
    return c


def result_body(_: object) -> dict[str, Any]:
    return {
        "data": {"metadata": json.dumps({"job_id": "j1"})},
        "files": {"artifact": ("out.txt", b"abc", "text/plain")},
    }


# One entry per job endpoint: a coroutine factory making the call.
JOB_CALLS: dict[str, tuple[str, Callable[[CoordinatorClient], Awaitable[Any]]]] = {
    "ack": ("jobs/ack", lambda c: c.ack("j1", "lease-1", 1)),
    "progress": ("jobs/progress", lambda c: c.progress("j1", 1, 50, "half")),
    "result": ("jobs/result", lambda c: c.result(result_body, idempotency_key="res-key")),
    "fail": ("jobs/fail", lambda c: c.fail({"job_id": "j1"}, idempotency_key="fail-key")),
    "upload_start": ("jobs/j1/uploads", lambda c: c.upload_start("j1", {"path": "o"})),
    "upload_put": ("uploads/u1", lambda c: c.upload_put("u1", b"abcd", 0, 8)),
}


# -- auth and headers -----------------------------------------------------------------


async def test_register_uses_bootstrap_token_then_node_token(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, make_client: MakeClient
) -> None:
    seen: list[RegisterReply] = []
    c = make_client(on_register=seen.append)
    assert not c.registered
    reply = await c.register()
    assert reply.node_token == "node-token-1"
    assert c.registered and seen == [reply]
    await c.heartbeat({"node_id": "n1", "seq": 1})
    await c.ack("j1", "lease-1", 1)
    reg, hb, ack = fake.calls
    assert (reg.endpoint, reg.token) == ("nodes/register", "boot-secret")
    assert reg.json() == {"node_id": "n1"}
    assert (hb.endpoint, hb.token) == ("nodes/heartbeat", "node-token-1")
    assert (ack.endpoint, ack.token) == ("jobs/ack", "node-token-1")
    assert ack.json() == {"job_id": "j1", "node_id": "n1", "lease_id": "lease-1", "attempt": 1}


async def test_first_call_without_a_token_registers_first(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, make_client: MakeClient
) -> None:
    c = make_client()
    await c.pull({"runners": ["cli"]}, wait_s=0)
    assert [x.endpoint for x in fake.calls] == ["nodes/register", "jobs/pull"]
    assert fake.calls[1].token == "node-token-1"


async def test_register_reply_expiry_parsed(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, make_client: MakeClient
) -> None:
    reply = {"node_token": "t-123", "expires_at": "2030-01-01T00:00:00Z"}
    fake.push("nodes/register", status(200, json=reply))
    c = make_client()
    await c.register()
    assert c.token_expires_at == datetime(2030, 1, 1, tzinfo=UTC).timestamp()


async def test_user_agent_on_every_request(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    await client.heartbeat({})
    await client.upload_status("u1")
    assert len(fake.calls) == 3
    for call in fake.calls:
        assert call.headers["user-agent"] == f"aitbc-miner/{__version__}"


async def test_every_mutating_request_has_a_fresh_idempotency_key(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    await client.heartbeat({})
    await client.pull({}, wait_s=1)
    for _, call in JOB_CALLS.values():
        await call(client)
    await client.deregister()
    await client.upload_status("u1")
    posts = [c for c in fake.calls if c.method != "GET"]
    assert len(posts) == 1 + 2 + len(JOB_CALLS) + 1
    keys = [c.key for c in posts]
    assert all(k is not None for k in keys)
    assert len(set(keys)) == len(keys)
    generated = [c.key for c in posts if c.endpoint not in ("jobs/result", "jobs/fail")]
    for key in generated:
        assert uuid.UUID(key)  # type: ignore[arg-type]
    assert fake.to("jobs/result")[0].key == "res-key"
    assert fake.to("jobs/fail")[0].key == "fail-key"
    [get] = [c for c in fake.calls if c.method == "GET"]
    assert get.key is None


# -- retries reuse the key ------------------------------------------------------------


async def test_503_then_200_reuses_the_key(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    fake.push("jobs/pull", status(503))
    t0 = trio.current_time()
    reply = await client.pull({}, wait_s=0)
    assert reply.job is None
    first, second = fake.to("jobs/pull")
    assert first.key == second.key and first.key is not None
    assert first.body == second.body
    assert trio.current_time() - t0 == pytest.approx(1.0)  # attempt 0: exactly min_s


@pytest.mark.parametrize(
    "exc_type", [httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError]
)
async def test_transport_error_then_200_reuses_the_key(
    autojump_clock: trio.testing.MockClock,
    fake: FakeCoordinator,
    client: CoordinatorClient,
    exc_type: type[httpx.TransportError],
) -> None:
    fake.push("jobs/ack", raise_(exc_type), raise_(exc_type))
    await client.ack("j1", "lease-1", 1)
    calls = fake.to("jobs/ack")
    assert len(calls) == 3
    assert len({c.key for c in calls}) == 1


async def test_result_retried_with_caller_key_and_fresh_body(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    built: list[int] = []

    def build(stack: object) -> dict[str, Any]:
        built.append(1)
        return result_body(stack)

    fake.push("jobs/result", status(502), raise_(httpx.ConnectError))
    await client.result(build, idempotency_key="final-key")
    calls = fake.to("jobs/result")
    assert [c.key for c in calls] == ["final-key"] * 3
    assert len(built) == 3
    assert all(b"abc" in c.body and b'filename="out.txt"' in c.body for c in calls)


@pytest.mark.parametrize("code", [408, 425, 429, 500, 502, 503, 504, 599])
async def test_retryable_statuses(
    autojump_clock: trio.testing.MockClock,
    fake: FakeCoordinator,
    client: CoordinatorClient,
    code: int,
) -> None:
    fake.push("jobs/fail", status(code))
    await client.fail({"job_id": "j1"}, idempotency_key="k")
    assert [c.key for c in fake.to("jobs/fail")] == ["k", "k"]


async def test_backoff_grows_with_full_jitter(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    fake.push("jobs/pull", *[status(503)] * 6)
    await client.pull({}, wait_s=0)
    times = [c.at for c in fake.to("jobs/pull")]
    assert len(times) == 7
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] == pytest.approx(1.0)
    for attempt, gap in enumerate(gaps):
        assert 1.0 <= gap <= min(8.0, 2.0**attempt) + 1e-9, (attempt, gap)
    assert max(gaps[3:]) > 2.0  # it really grows beyond the early caps


# -- 401 -------------------------------------------------------------------------------


async def test_401_reregisters_then_retries_with_new_token_and_same_key(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    fake.push("jobs/ack", status(401))
    await client.ack("j1", "lease-1", 1)
    assert [c.endpoint for c in fake.calls] == [
        "nodes/register", "jobs/ack", "nodes/register", "jobs/ack",
    ]  # fmt: skip
    first, retry = fake.to("jobs/ack")
    assert first.token == "node-token-1" and retry.token == "node-token-2"
    assert first.key == retry.key
    assert all(c.token == "boot-secret" for c in fake.to("nodes/register"))
    await client.heartbeat({})
    assert fake.to("nodes/heartbeat")[0].token == "node-token-2"


async def test_concurrent_401s_reregister_once(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    arrived = 0
    both_in = trio.Event()

    async def expire_old_token(request: httpx.Request) -> httpx.Response:
        nonlocal arrived
        if request.headers["authorization"] == "Bearer node-token-1":
            arrived += 1
            if arrived == 2:
                both_in.set()
            await both_in.wait()  # both calls hold the old token before either gets its 401
            return status(401)
        return status(200, json={})

    fake.push("jobs/ack", *[expire_old_token] * 4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.ack, "j1", "lease-1", 1)
        nursery.start_soon(client.ack, "j2", "lease-2", 1)
    assert len(fake.to("nodes/register")) == 2  # the initial one + exactly one re-register
    acks = fake.to("jobs/ack")
    assert len(acks) == 4
    by_job: dict[str, list[Call]] = defaultdict(list)
    for call in acks:
        by_job[call.json()["job_id"]].append(call)
    for calls in by_job.values():
        assert [c.token for c in calls] == ["node-token-1", "node-token-2"]
        assert calls[0].key == calls[1].key


async def test_401_on_register_without_retry_is_rejected(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, make_client: MakeClient
) -> None:
    fake.push("nodes/register", status(401))
    c = make_client()
    with pytest.raises(RequestRejected) as info:
        await c.register(retry=False)
    assert info.value.status == 401
    assert not c.registered and len(fake.calls) == 1


async def test_401_on_register_with_retry_backs_off_then_succeeds(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, make_client: MakeClient
) -> None:
    fake.push("nodes/register", status(401), status(401))
    c = make_client()
    t0 = trio.current_time()
    await c.register()
    assert len(fake.to("nodes/register")) == 3
    assert trio.current_time() - t0 >= 2.0  # two backoff sleeps of at least min_s
    assert c.registered


# -- non-retryable answers --------------------------------------------------------------


@pytest.mark.parametrize("name", ["heartbeat", "pull", "ack", "fail"])
async def test_403_node_rejected_without_retry(
    autojump_clock: trio.testing.MockClock,
    fake: FakeCoordinator,
    client: CoordinatorClient,
    name: str,
) -> None:
    calls: dict[str, tuple[str, Callable[[CoordinatorClient], Awaitable[Any]]]] = {
        "heartbeat": ("nodes/heartbeat", lambda c: c.heartbeat({})),
        "pull": ("jobs/pull", lambda c: c.pull({}, wait_s=0)),
        **JOB_CALLS,
    }
    endpoint, call = calls[name]
    fake.push(endpoint, status(403, text="node banned"))
    with pytest.raises(NodeRejected) as info:
        await call(client)
    assert "node banned" in str(info.value)
    assert len(fake.to(endpoint)) == 1


@pytest.mark.parametrize("code", [404, 409, 410])
@pytest.mark.parametrize("name", list(JOB_CALLS))
async def test_job_gone_on_job_endpoints(
    autojump_clock: trio.testing.MockClock,
    fake: FakeCoordinator,
    client: CoordinatorClient,
    name: str,
    code: int,
) -> None:
    endpoint, call = JOB_CALLS[name]
    fake.push(endpoint, status(code, text="lease lost"))
    t0 = trio.current_time()
    with pytest.raises(JobGone) as info:
        await call(client)
    assert info.value.status == code
    assert len(fake.to(endpoint)) == 1
    assert trio.current_time() == t0


@pytest.mark.parametrize("code", [404, 409, 410])
async def test_gone_statuses_on_node_endpoints_are_not_job_gone(
    autojump_clock: trio.testing.MockClock,
    fake: FakeCoordinator,
    client: CoordinatorClient,
    code: int,
) -> None:
    fake.push("nodes/heartbeat", status(code))
    fake.push("jobs/pull", status(code))
    with pytest.raises(RequestRejected) as hb:
        await client.heartbeat({})
    with pytest.raises(RequestRejected) as pull:
        await client.pull({}, wait_s=0)
    assert not isinstance(hb.value, JobGone) and hb.value.status == code
    assert pull.value.status == code
    assert len(fake.to("nodes/heartbeat")) == 1 and len(fake.to("jobs/pull")) == 1


@pytest.mark.parametrize("code", [400, 405, 413, 422])
@pytest.mark.parametrize("name", ["pull", "ack", "result"])
async def test_other_4xx_rejected_once(
    autojump_clock: trio.testing.MockClock,
    fake: FakeCoordinator,
    client: CoordinatorClient,
    name: str,
    code: int,
) -> None:
    calls = {"pull": ("jobs/pull", lambda c: c.pull({}, wait_s=0)), **JOB_CALLS}
    endpoint, call = calls[name]
    fake.push(endpoint, status(code, text="sha256 mismatch"))
    with pytest.raises(RequestRejected) as info:
        await call(client)
    assert info.value.status == code
    assert info.value.body == "sha256 mismatch"
    assert len(fake.to(endpoint)) == 1


# -- Retry-After --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "header", "slept"),
    [(503, "5", 5.0), (429, "3", 3.0), (503, "0", 0.0), (503, "3600", 8.0)],
)
async def test_retry_after_seconds_honoured_and_capped(
    autojump_clock: trio.testing.MockClock,
    fake: FakeCoordinator,
    client: CoordinatorClient,
    code: int,
    header: str,
    slept: float,
) -> None:  # fmt: skip
    fake.push("jobs/ack", status(code, headers={"Retry-After": header}))
    t0 = trio.current_time()
    await client.ack("j1", "lease-1", 1)
    assert trio.current_time() - t0 == pytest.approx(slept)
    assert len(fake.to("jobs/ack")) == 2


async def test_retry_after_http_date_honoured(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    # Whole seconds on the wire: aim 6 s ahead of the next full second.
    now = datetime.now(UTC)
    when = now.replace(microsecond=0) + timedelta(seconds=7)
    fake.push("jobs/pull", status(503, headers={"Retry-After": format_datetime(when, True)}))
    t0 = trio.current_time()
    await client.pull({}, wait_s=0)
    slept = trio.current_time() - t0
    assert 5.0 <= slept <= 7.0, slept  # min_s alone would have been exactly 1.0


async def test_retry_after_http_date_in_the_past_means_now(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    fake.push("jobs/pull", status(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    t0 = trio.current_time()
    await client.pull({}, wait_s=0)
    assert trio.current_time() - t0 == pytest.approx(0.0)


async def test_non_ascii_digit_retry_after_falls_back_to_backoff(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    fake.push("jobs/ack", status(503, headers=[(b"Retry-After", "²".encode())]))
    t0 = trio.current_time()
    await client.ack("j1", "lease-1", 1)
    assert trio.current_time() - t0 == pytest.approx(1.0)


async def test_heartbeat_503_raises_unavailable_with_retry_after(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    fake.push("nodes/heartbeat", status(503, headers={"Retry-After": "7"}))
    t0 = trio.current_time()
    with pytest.raises(CoordinatorUnavailable) as info:
        await client.heartbeat({})
    assert info.value.retry_after == 7.0
    assert len(fake.to("nodes/heartbeat")) == 1
    assert trio.current_time() == t0  # the caller owns the backoff


async def test_heartbeat_transport_error_raises_unavailable(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    fake.push("nodes/heartbeat", raise_(httpx.ConnectError))
    with pytest.raises(CoordinatorUnavailable) as info:
        await client.heartbeat({})
    assert info.value.retry_after is None
    assert len(fake.to("nodes/heartbeat")) == 1


# -- malformed and oversized replies ----------------------------------------------------


async def test_malformed_pull_replies_are_retried(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    job = {"job_id": "j1", "runner": "cli", "timeout_s": 5, "command": "x"}
    fake.push(
        "jobs/pull",
        status(200, text="<html>proxy error</html>"),
        status(200, json={"job": 5}),
        status(200, json=[1, 2]),
        status(200, json={"job": job, "lease": {"lease_id": 7}}),
        status(200, json={"job": job, "lease": {"lease_id": "l1"}}),
    )
    reply = await client.pull({}, wait_s=0)
    assert reply.job == job and reply.lease is not None and reply.lease.lease_id == "l1"
    calls = fake.to("jobs/pull")
    assert len(calls) == 5 and len({c.key for c in calls}) == 1


@pytest.mark.parametrize(
    "bad",
    [
        status(200, text="not json"),
        status(200, text=""),
        status(200, json={"status": "bogus"}),
        status(200, json={"cancel": "j1"}),
        status(200, json=None),
    ],
)
async def test_malformed_heartbeat_reply_raises_unavailable(
    autojump_clock: trio.testing.MockClock,
    fake: FakeCoordinator,
    client: CoordinatorClient,
    bad: httpx.Response,
) -> None:
    fake.push("nodes/heartbeat", bad)
    with pytest.raises(CoordinatorUnavailable) as info:
        await client.heartbeat({})
    assert "malformed" in str(info.value)
    assert len(fake.to("nodes/heartbeat")) == 1


async def test_oversized_reply_is_refused(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, make_client: MakeClient
) -> None:
    c = make_client(max_response_bytes=200)
    await c.register()
    big = {"status": "active", "cancel": [f"job-{i:04d}" for i in range(100)]}
    assert len(json.dumps(big)) > 200  # valid, and would parse fine if it were read
    fake.push("nodes/heartbeat", status(200, json=big))
    with pytest.raises(CoordinatorUnavailable) as info:
        await c.heartbeat({})
    assert "larger than 200 bytes" in str(info.value)


async def test_oversized_reply_on_retrying_call_is_retried(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, make_client: MakeClient
) -> None:
    c = make_client(max_response_bytes=200)
    await c.register()
    fake.push("jobs/pull", status(200, json={"job": {"pad": "x" * 500}}))
    reply = await c.pull({}, wait_s=0)
    assert reply.job is None
    assert len(fake.to("jobs/pull")) == 2


async def test_untyped_replies_tolerate_any_body(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    fake.push("jobs/result", status(200, json={"duplicate": True}))
    fake.push("jobs/fail", status(200, text="OK"))
    assert await client.result(result_body, idempotency_key="k") == {"duplicate": True}
    assert await client.fail({}, idempotency_key="k2") is None
    assert len(fake.to("jobs/result")) == 1 and len(fake.to("jobs/fail")) == 1


# -- uploads ------------------------------------------------------------------------------


async def test_upload_put_416_reports_what_the_server_has(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    fake.push("uploads/u1", status(416, json={"received": 10}))
    received, accepted = await client.upload_put("u1", b"0123456789", 20, 100)
    assert (received, accepted) == (10, False)
    [put] = fake.to("uploads/u1")
    assert put.method == "PUT"
    assert put.headers["content-range"] == "bytes 20-29/100"
    assert put.body == b"0123456789"


async def test_upload_put_accepted(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    fake.push("uploads/u1", status(200, json={"received": 30}))
    assert await client.upload_put("u1", b"0123456789", 20, 100) == (30, True)


async def test_upload_start_and_status(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, client: CoordinatorClient
) -> None:
    started = await client.upload_start("j1", {"path": "o", "size": 8}, idempotency_key="up-k")
    assert (started.upload_id, started.chunk_size, started.received) == ("u1", 4, 0)
    st = await client.upload_status("u1")
    assert (st.received, st.size, st.complete) == (4, 8, False)
    assert fake.to("jobs/j1/uploads")[0].key == "up-k"


# -- metrics ------------------------------------------------------------------------------


async def test_requests_are_counted_by_endpoint_and_code(
    autojump_clock: trio.testing.MockClock, fake: FakeCoordinator, make_client: MakeClient
) -> None:
    metrics = Metrics()
    c = make_client(metrics=metrics)
    fake.push("jobs/pull", status(503), raise_(httpx.ConnectError))
    await c.pull({}, wait_s=0)
    value = metrics.registry.get_sample_value

    def count(endpoint: str, code: str) -> float | None:
        return value("aitbc_miner_coordinator_requests_total",
                     {"endpoint": endpoint, "code": code})  # fmt: skip

    assert count("jobs/pull", "503") == 1
    assert count("jobs/pull", "error") == 1
    assert count("jobs/pull", "200") == 1
    assert count("nodes/register", "200") == 1


# -- parse_retry_after ------------------------------------------------------------------

NOW = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("5", 5.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("120", 120.0),
        ("86400", 86400.0),
        ("99999999999999999999", 86400.0),
        ("-5", None),
        ("1.5", None),
        ("5s", None),
        ("soon", None),
        ("²", None),  # a digit to str.isdigit(), not to int()
        ("٣", None),  # delay-seconds are ASCII digits only (RFC 9110)
        ("Wed, 21 Oct 2015 07:28:30 GMT", 30.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 09:28:30 +0200", 30.0),
        ("Wed, 21 Oct 2015 07:28:30", 30.0),  # no zone: read as UTC
        ("Wed, 32 Oct 2015 07:28:30 GMT", None),
        ("Wed, 21 Foo 2015 07:28:30 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    got = parse_retry_after(value, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_parse_retry_after_date_uses_wall_clock_by_default() -> None:
    soon = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=61)
    got = parse_retry_after(format_datetime(soon, True))
    assert got is not None and 59.0 <= got <= 61.0


@pytest.mark.parametrize(
    ("now", "issued", "expires", "due"),
    [
        (0, 0, 3600, False),  # a fresh hour-long token
        (3570, 0, 3600, True),  # 30 s left < 2 heartbeats + 5 s
        (3560, 0, 3600, False),  # 40 s left
        (0, 0, 30, False),  # a 30 s token, just issued: not on every heartbeat
        (14, 0, 30, False),  # 16 s left: more than half its life
        (16, 0, 30, True),  # 14 s left: less than half its life
        (100, None, 130, True),  # issue time unknown: 2 heartbeats + 5 s
        (0, 0, None, False),  # no expiry given: nothing to renew
        (50, 0, 30, True),  # already expired
    ],
)
def test_token_renewal_is_due_two_heartbeats_early_but_not_before_half_life(
    now, issued, expires, due
):
    assert token_renewal_due(now, issued, expires, heartbeat_s=15) is due
