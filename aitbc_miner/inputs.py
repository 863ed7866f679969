"""Job input downloads: the URL and address policy (pure) and the streaming fetcher.

For: fetching a manifest's `input.urls` into a workspace. Only http(s), on every
redirect hop; never connecting to a link-local/metadata (169.254.0.0/16, fe80::/10)
or unique-local (fc00::/7, which holds fd00::/8) address, whether the URL names it
literally, in a legacy numeric form, or through a DNS name that resolves to it, unless
`security.allow_private_inputs`; size-capped while streaming; sha256-checked.
Must not: send credentials (the download client carries none and ignores proxy/netrc
environment), follow redirects implicitly, or let an httpx/OS error escape: every
problem is a JobFailure(E_INPUT) with a reason that is safe to report.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpcore
import httpx
import trio

from .errors import ErrorCode, JobFailure

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[IPAddress]]]

MAX_REDIRECTS = 5
ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
BLOCKED_NETWORKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (ipaddress.ip_network("169.254.0.0/16"), "link-local/metadata"),
    (ipaddress.ip_network("fe80::/10"), "IPv6 link-local"),
    (ipaddress.ip_network("fc00::/7"), "IPv6 unique-local/metadata"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NUMERIC_HOST_RE = re.compile(r"[0-9a-fA-FxX.]+")
_OVERRIDE_HINT = "set security.allow_private_inputs to allow"


# --- policy (pure) ---------------------------------------------------------------------


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one tunnels to (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def address_refusal(ip: IPAddress) -> str | None:
    """Why a job input must not be fetched from `ip`, or None when it may."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            candidates.append(inner)
    for candidate in candidates:
        for network, kind in BLOCKED_NETWORKS:
            if candidate.version == network.version and candidate in network:
                return f"{candidate} is in {network} ({kind})"
    return None


def literal_ip(host: str) -> IPAddress | None:
    """The address a URL host names without DNS: dotted, bracketed v6, or the legacy
    numeric IPv4 forms (`2852039166`, `0xa9.0xfe.0xa9.0xfe`, `169.254.43518`) that
    the C resolver also accepts."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST_RE.fullmatch(host) and not host.startswith(".") and ".." not in host:
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def url_refusal(url: str) -> str | None:
    """Why `url` may not be requested at all (scheme, host), or None."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return "not a valid URL"
    scheme = parsed.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        return f"scheme {scheme[:16]!r} is not http(s)"
    if not parsed.host:
        return "URL has no host"
    return None


# --- connecting: every connection, every hop, literal or resolved ----------------------


class InputAddressRefused(httpcore.ConnectError):
    """A connection the address policy forbids (httpx re-raises it as ConnectError)."""


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in resolver order (duplicates dropped)."""
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise httpcore.ConnectError(f"cannot resolve {host[:253]!r}: {exc}") from None
    out: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
        if ip not in out:
            out.append(ip)
    return out


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore network backend that resolves the host itself, refuses forbidden
    addresses and then connects to the checked address, so a DNS answer cannot
    change between the check and the connect."""

    def __init__(
        self,
        *,
        allow_private: bool,
        resolver: Resolver = resolve,
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self.allow_private = allow_private
        self._resolve = resolver
        self._inner = inner or httpcore.TrioBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        literal = literal_ip(host)
        addresses = [literal] if literal is not None else list(await self._resolve(host, port))
        if not addresses:
            raise httpcore.ConnectError(f"{host[:253]!r} resolves to no address")
        if not self.allow_private:
            for ip in addresses:
                reason = address_refusal(ip)
                if reason is not None:
                    shown = host if literal is not None else f"{host[:253]} ({ip})"
                    raise InputAddressRefused(f"refused to connect to {shown}: {reason}")
        last: Exception | None = None
        for ip in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(ip), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise InputAddressRefused("unix sockets are not an input source")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool on a GuardedBackend."""

    def __init__(
        self,
        *,
        allow_private: bool,
        resolver: Resolver = resolve,
        verify: bool | Any = True,
    ) -> None:
        super().__init__(verify=verify, trust_env=False, retries=0)
        # httpx builds its pool without a way to pass a network backend; rebuild it
        # with the same TLS context (the only setting we do not leave at default).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=16,
            max_keepalive_connections=8,
            keepalive_expiry=5.0,
            network_backend=GuardedBackend(allow_private=allow_private, resolver=resolver),
        )


def download_client(
    timeout_s: float, *, allow_private: bool, resolver: Resolver = resolve
) -> httpx.AsyncClient:
    """The daemon's one client for job inputs: no credentials, no env proxies or
    netrc, no implicit redirects, every connection checked by the address policy."""
    return httpx.AsyncClient(
        transport=GuardedTransport(allow_private=allow_private, resolver=resolver),
        timeout=timeout_s,
        follow_redirects=False,
        trust_env=False,
        headers={"User-Agent": "aitbc-miner-inputs"},
    )


# --- fetching --------------------------------------------------------------------------


def _fail(label: str, reason: str, *, retryable: bool | None = None) -> JobFailure:
    return JobFailure(ErrorCode.INPUT, f"input {label}: {reason}", retryable=retryable)


def _refused(label: str, reason: str) -> JobFailure:
    # A policy refusal is the same on every attempt: retrying would not help.
    return _fail(label, reason, retryable=False)


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    target: Path,
    *,
    limit_bytes: int,
    sha256: str | None,
    label: str,
) -> int:
    """Stream `url` to `target` (via a hidden .part file, O_NOFOLLOW), following at
    most MAX_REDIRECTS http(s) redirects; returns the size. JobFailure(E_INPUT) else."""
    partial = target.with_name(f".{target.name}.part")
    current = url
    try:
        for _hop in range(MAX_REDIRECTS + 1):
            reason = url_refusal(current)
            if reason is not None:
                where = "redirect target" if current != url else "URL"
                raise _refused(label, f"{where} refused: {reason}")
            async with client.stream("GET", current, follow_redirects=False) as response:
                if response.status_code in REDIRECT_STATUS:
                    location = response.headers.get("location")
                    if not location:
                        raise _fail(label, f"HTTP {response.status_code} without a Location")
                    try:
                        current = str(response.url.join(location))
                    except (httpx.InvalidURL, ValueError):
                        raise _refused(label, "redirect to an invalid URL") from None
                    continue
                if response.status_code != 200:
                    raise _fail(label, f"HTTP {response.status_code}")
                return await _store(response, partial, target, limit_bytes, sha256, label)
        raise _refused(label, f"more than {MAX_REDIRECTS} redirects")
    except httpx.InvalidURL:
        # `current` passed url_refusal, so httpx choked on a redirect's Location.
        raise _refused(label, "redirect target refused: not a valid URL") from None
    except httpx.HTTPError as exc:
        cause = exc.__cause__
        if isinstance(cause, InputAddressRefused):
            raise _refused(label, f"{cause} ({_OVERRIDE_HINT})") from None
        raise _fail(label, f"{type(exc).__name__}: {str(exc)[:200]}") from None
    except OSError as exc:
        raise _fail(label, f"cannot write ({exc.strerror or type(exc).__name__})") from None
    finally:
        partial.unlink(missing_ok=True)


async def _store(
    response: httpx.Response,
    partial: Path,
    target: Path,
    limit_bytes: int,
    sha256: str | None,
    label: str,
) -> int:
    limit_mib = max(1, limit_bytes // (1024 * 1024))
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit_bytes:
        raise _fail(label, f"larger than {limit_mib} MiB (Content-Length {declared})")
    digest = hashlib.sha256()
    size = 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(partial, flags, 0o600), "wb") as fh:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit_bytes:
                raise _fail(label, f"larger than {limit_mib} MiB")
            digest.update(chunk)
            fh.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise _fail(label, "sha256 mismatch")
    os.replace(partial, target)
    return size
