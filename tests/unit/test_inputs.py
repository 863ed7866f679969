"""Job input policy and fetcher: the pure URL/address rules with IP literals, the
redirect/size/sha256 logic against an httpx.MockTransport handler, and the guarded
connect path against real loopback sockets with an injected resolver."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
import trio

from aitbc_miner.errors import ErrorCode, JobFailure
from aitbc_miner.inputs import (
    MAX_REDIRECTS,
    GuardedBackend,
    IPAddress,
    address_refusal,
    download_client,
    fetch,
    literal_ip,
    url_refusal,
)
from tests.support.httpserver import CannedServer

MIB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the address policy -------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",  # AWS/GCP/Azure metadata
        "169.254.0.1",
        "169.254.255.255",
        "fe80::1",
        "[fe80::1]",
        "fe80::1%eth0",
        "febf:ffff::1",
        "fd00:ec2::254",  # AWS IPv6 metadata
        "fd12:3456::1",
        "fc00::1",
        "::ffff:169.254.169.254",  # IPv4-mapped
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "2852039166",  # decimal 169.254.169.254
        "0xa9fea9fe",
        "0xa9.0xfe.0xa9.0xfe",
        "0251.0376.0251.0376",  # octal
        "169.254.43518",
    ],
)
def test_link_local_and_metadata_literals_are_refused(host: str) -> None:
    ip = literal_ip(host)
    assert ip is not None, host
    reason = address_refusal(ip)
    assert reason is not None and ("169.254" in reason or "f" in reason), reason


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.1", "::1", "10.0.0.1", "192.168.1.10", "8.8.8.8", "2001:db8::1",
     "fec0::1", "169.253.255.255", "169.255.0.0", "0.0.0.0"],
)  # fmt: skip
def test_other_addresses_are_allowed(host: str) -> None:
    ip = literal_ip(host)
    assert ip is not None
    assert address_refusal(ip) is None


@pytest.mark.parametrize("host", ["example.com", "cafe.be", "localhost", "deadbeef", "1.2.3.4.5"])
def test_names_are_not_literals(host: str) -> None:
    assert literal_ip(host) is None


@pytest.mark.parametrize(
    "url, word",
    [
        ("file:///etc/passwd", "'file'"),
        ("ftp://example.com/x", "'ftp'"),
        ("gopher://example.com/", "'gopher'"),
        ("data:text/plain,hi", "'data'"),
        ("unix:/run/docker.sock", "'unix'"),
        ("http://", "no host"),
        ("//example.com/x", "is not http(s)"),
    ],
)
def test_url_refusal(url: str, word: str) -> None:
    reason = url_refusal(url)
    assert reason is not None and word in reason, reason


@pytest.mark.parametrize("url", ["http://example.com/x", "HTTPS://EXAMPLE.com:8443/a?b=c"])
def test_url_allowed(url: str) -> None:
    assert url_refusal(url) is None


# -- the fetcher, against a handler -------------------------------------------------------


def client_for(handler: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=False)


async def fetch_into(
    tmp_path: Path, handler: Any, url: str = "http://in.test/a", **kw: Any
) -> tuple[int, Path]:
    target = tmp_path / "in.bin"
    kw.setdefault("limit_bytes", MIB)
    kw.setdefault("sha256", None)
    async with client_for(handler) as client:
        size = await fetch(client, url, target, label="in.bin", **kw)
    return size, target


def assert_clean(tmp_path: Path) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "partial or target file left"


async def test_fetch_stores_file_with_sha256(tmp_path: Path) -> None:
    data = b"payload" * 1000
    size, target = await fetch_into(
        tmp_path, lambda r: httpx.Response(200, content=data), sha256=sha(data)
    )
    assert size == len(data) and target.read_bytes() == data
    assert target.stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(".*.part"))


async def test_fetch_follows_http_redirects_and_never_sends_auth(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/a":
            return httpx.Response(302, headers={"Location": "/b"})
        if request.url.path == "/b":
            return httpx.Response(307, headers={"Location": "https://other.test/c"})
        return httpx.Response(200, content=b"ok")

    _, target = await fetch_into(tmp_path, handler)
    assert target.read_bytes() == b"ok"
    assert [str(r.url) for r in seen] == [
        "http://in.test/a", "http://in.test/b", "https://other.test/c"]  # fmt: skip
    assert all("authorization" not in r.headers for r in seen)


@pytest.mark.parametrize(
    "location, word",
    [
        ("file:///etc/passwd", "'file'"),
        ("ftp://in.test/x", "'ftp'"),
        ("gopher://in.test/", "'gopher'"),
        ("javascript:alert(1)", "not a valid URL"),
    ],
)
async def test_redirect_to_non_http_scheme_is_refused(
    tmp_path: Path, location: str, word: str
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.host == "in.test", f"followed to {request.url}"
        return httpx.Response(301, headers={"Location": location})

    with pytest.raises(JobFailure) as info:
        await fetch_into(tmp_path, handler)
    assert info.value.code is ErrorCode.INPUT
    assert "redirect target refused" in info.value.message and word in info.value.message
    assert info.value.retryable is False
    assert_clean(tmp_path)


async def test_redirect_loop_is_bounded(tmp_path: Path) -> None:
    hops: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hops.append(str(request.url))
        return httpx.Response(302, headers={"Location": f"/r{len(hops)}"})

    with pytest.raises(JobFailure) as info:
        await fetch_into(tmp_path, handler)
    assert info.value.code is ErrorCode.INPUT and "redirects" in info.value.message
    assert len(hops) == MAX_REDIRECTS + 1


async def test_redirect_without_location(tmp_path: Path) -> None:
    with pytest.raises(JobFailure) as info:
        await fetch_into(tmp_path, lambda r: httpx.Response(302))
    assert "without a Location" in info.value.message


@pytest.mark.parametrize("status", [204, 206, 404, 500])
async def test_non_200_is_e_input(tmp_path: Path, status: int) -> None:
    with pytest.raises(JobFailure) as info:
        await fetch_into(tmp_path, lambda r: httpx.Response(status, content=b"x"))
    assert info.value.code is ErrorCode.INPUT and f"HTTP {status}" in info.value.message
    assert info.value.retryable is True
    assert_clean(tmp_path)


async def test_declared_length_over_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": str(5 * MIB)}, content=b"")

    with pytest.raises(JobFailure) as info:
        await fetch_into(tmp_path, handler, limit_bytes=MIB)
    assert "larger than 1 MiB" in info.value.message and "Content-Length" in info.value.message


async def test_streamed_body_over_the_cap_is_cut_off(tmp_path: Path) -> None:
    sent = 0

    async def endless() -> Any:
        nonlocal sent
        while True:
            sent += 64 * 1024
            yield b"x" * (64 * 1024)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=endless())  # chunked: no Content-Length

    with pytest.raises(JobFailure) as info:
        await fetch_into(tmp_path, handler, limit_bytes=MIB)
    assert "larger than 1 MiB" in info.value.message
    assert sent <= MIB + 128 * 1024, "kept reading past the cap"
    assert_clean(tmp_path)


async def test_sha256_mismatch(tmp_path: Path) -> None:
    with pytest.raises(JobFailure) as info:
        await fetch_into(tmp_path, lambda r: httpx.Response(200, content=b"a"), sha256="0" * 64)
    assert info.value.code is ErrorCode.INPUT and "sha256 mismatch" in info.value.message
    assert_clean(tmp_path)


async def test_transport_error_is_e_input(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(JobFailure) as info:
        await fetch_into(tmp_path, handler)
    assert info.value.code is ErrorCode.INPUT and "ReadTimeout" in info.value.message


async def test_target_that_is_a_symlink_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ".in.bin.part").symlink_to(outside)
    async with client_for(lambda r: httpx.Response(200, content=b"new")) as client:
        with pytest.raises(JobFailure):
            await fetch(client, "http://in.test/a", ws / "in.bin", limit_bytes=MIB,
                        sha256=None, label="in.bin")  # fmt: skip
    assert outside.read_bytes() == b"keep"


# -- the guarded connect path ---------------------------------------------------------------


Server = CannedServer


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


NAMES = {
    "files.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": ["127.0.0.1", "fd00:ec2::254"],
    "v6ll.test": ["fe80::1"],
}


async def fake_resolver(host: str, port: int) -> Sequence[IPAddress]:
    if host not in NAMES:
        raise httpcore.ConnectError(f"cannot resolve {host!r}")
    return [ipaddress.ip_address(a) for a in NAMES[host]]


async def guarded_fetch(tmp_path: Path, url: str, *, allow_private: bool = False) -> bytes:
    target = tmp_path / "in.bin"
    async with download_client(5.0, allow_private=allow_private, resolver=fake_resolver) as c:
        await fetch(c, url, target, limit_bytes=MIB, sha256=None, label="in.bin")
    return target.read_bytes()


async def test_loopback_by_name_is_fetched_for_real(tmp_path: Path, server: Server) -> None:
    server.routes["/f"] = (200, {}, b"hello")
    assert await guarded_fetch(tmp_path, f"http://files.test:{server.port}/f") == b"hello"
    _, headers = server.requests[0]
    assert headers["Host"] == f"files.test:{server.port}"  # connected by IP, asked by name
    assert "Authorization" not in headers


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://2852039166/latest/meta-data/", "169.254.169.254"),
        ("http://0xa9.0xfe.0xa9.0xfe/", "169.254.169.254"),
        ("http://[fe80::1]/", "fe80::1"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254"),
        ("http://[::ffff:169.254.169.254]/", "169.254.169.254"),
        ("http://metadata.test/computeMetadata/v1/", "169.254.169.254"),
        ("http://mixed.test/x", "fd00:ec2::254"),
        ("https://v6ll.test/x", "fe80::1"),
    ],
)
async def test_forbidden_destinations_are_refused_before_connecting(
    tmp_path: Path, url: str, shown: str
) -> None:
    with trio.fail_after(5):  # refused at once, never a connect timeout
        with pytest.raises(JobFailure) as info:
            await guarded_fetch(tmp_path, url)
    failure = info.value
    assert failure.code is ErrorCode.INPUT and failure.retryable is False
    assert "refused to connect" in failure.message and shown in failure.message
    assert "allow_private_inputs" in failure.message
    assert_clean(tmp_path)


async def test_redirect_hop_into_metadata_is_refused(tmp_path: Path, server: Server) -> None:
    server.routes["/r1"] = (302, {"Location": f"http://files.test:{server.port}/r2"}, b"")
    server.routes["/r2"] = (301, {"Location": "http://169.254.169.254/latest/meta-data/"}, b"")
    with trio.fail_after(5):
        with pytest.raises(JobFailure) as info:
            await guarded_fetch(tmp_path, f"http://127.0.0.1:{server.port}/r1")
    assert "169.254.169.254" in info.value.message
    assert [p for p, _ in server.requests] == ["/r1", "/r2"]


async def test_redirect_hop_to_a_name_resolving_to_metadata_is_refused(
    tmp_path: Path, server: Server
) -> None:
    server.routes["/r"] = (307, {"Location": "http://metadata.test/latest/"}, b"")
    with pytest.raises(JobFailure) as info:
        await guarded_fetch(tmp_path, f"http://127.0.0.1:{server.port}/r")
    assert "metadata.test (169.254.169.254)" in info.value.message


async def test_redirect_to_file_scheme_over_real_http(tmp_path: Path, server: Server) -> None:
    server.routes["/r"] = (302, {"Location": "file:///etc/passwd"}, b"")
    with pytest.raises(JobFailure) as info:
        await guarded_fetch(tmp_path, f"http://127.0.0.1:{server.port}/r")
    assert "'file'" in info.value.message


class RecordingBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kw: Any) -> Any:
        self.connects.append((host, port))
        raise httpcore.ConnectError("recorded, not connected")


async def test_allow_private_inputs_lets_the_connect_happen() -> None:
    inner = RecordingBackend()
    backend = GuardedBackend(allow_private=True, resolver=fake_resolver, inner=inner)
    with pytest.raises(httpcore.ConnectError, match="recorded"):
        await backend.connect_tcp("metadata.test", 80)
    assert inner.connects == [("169.254.169.254", 80)]


async def test_backend_connects_to_the_checked_address_only() -> None:
    inner = RecordingBackend()
    backend = GuardedBackend(allow_private=False, resolver=fake_resolver, inner=inner)
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("files.test", 8080)
    assert inner.connects == [("127.0.0.1", 8080)]  # never the name: no second DNS lookup


async def test_unix_sockets_are_refused() -> None:
    backend = GuardedBackend(allow_private=True, inner=RecordingBackend())
    with pytest.raises(httpcore.ConnectError, match="unix"):
        await backend.connect_unix_socket("/run/docker.sock")


async def test_real_resolver_handles_localhost(tmp_path: Path, server: Server) -> None:
    server.routes["/f"] = (200, {}, b"via-dns")
    target = tmp_path / "f"
    async with download_client(5.0, allow_private=False) as client:
        await fetch(client, f"http://localhost:{server.port}/f", target, limit_bytes=MIB,
                    sha256=sha(b"via-dns"), label="f")  # fmt: skip
    assert target.read_bytes() == b"via-dns"
