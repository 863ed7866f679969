"""Shared pieces of the mock coordinator: options, the API error type, time and JSON
formats, request-body field checks and artifact path rules. No I/O except atomic_write."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

MiB = 1024 * 1024

ERROR_CODES = frozenset(
    {
        "E_INVALID", "E_SIGNATURE", "E_DENY", "E_INPUT", "E_NOGPU", "E_OOM",
        "E_TIMEOUT", "E_EXIT", "E_OUTPUT", "E_DISK", "E_CANCELLED", "E_CRASH",
    }
)  # fmt: skip
NODE_STATUSES = ("active", "pending", "disabled", "banned")
SAFE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything the command line can set; one frozen value handed to the server."""

    host: str = "127.0.0.1"
    port: int = 8080
    state_file: Path | None = None
    data_dir: Path | None = None
    bootstrap_token: str = "dev-bootstrap-token"  # noqa: S105 - a well-known dev default
    ready_file: Path | None = None
    signing_key_file: Path | None = None
    hmac_secret: str | None = None
    lease_s: float = 30.0
    token_ttl_s: float = 3600.0
    pending_by_default: bool = False
    heartbeat_interval_s: float | None = None
    max_attempts: int = 5
    chunk_size: int = 4 * MiB
    seed: int | None = None
    log_requests: bool = False
    key_id: str = "mock-ed25519"
    certfile: Path | None = None  # serve https with this certificate chain (PEM) ...
    keyfile: Path | None = None  # ... and this private key


class ApiError(Exception):
    """A refusal that becomes a JSON answer `{"error": ..., **extra}` with `status`."""

    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(f"{status} {error}")
        self.status = status
        self.error = error
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.error, **self.extra}


def rfc3339(ts: float) -> str:
    """UTC RFC 3339 with milliseconds and a `Z`, e.g. 2025-01-02T03:04:05.678Z."""
    text = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def canonical(obj: Any) -> bytes:
    """The canonical JSON bytes PROTOCOL.md signs and this mock fingerprints."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_KINDS: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "number": (int, float),
    "bool": (bool,),
    "list": (list,),
    "object": (dict,),
}


def is_kind(value: Any, kind: str) -> bool:
    """JSON type check where booleans are never numbers."""
    if kind != "bool" and isinstance(value, bool):
        return False
    return isinstance(value, _KINDS[kind])


def field(
    body: dict[str, Any], name: str, kind: str, *, required: bool = True, nullable: bool = False
) -> Any:
    """Return body[name] after checking its JSON type; 422 when missing or wrong."""
    if name not in body:
        if required:
            raise ApiError(422, f"missing field {name!r}")
        return None
    value = body[name]
    if value is None and nullable:
        return None
    if not is_kind(value, kind):
        raise ApiError(422, f"field {name!r} must be {kind}{' or null' if nullable else ''}")
    return value


def str_list(body: dict[str, Any], name: str, *, required: bool = True) -> list[str] | None:
    value = field(body, name, "list", required=required)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise ApiError(422, f"field {name!r} must be a list of strings")
    return value


def safe_relpath(path: Any, what: str = "path") -> str:
    """Accept only a normalised relative POSIX path with no `..`, NUL or absolute form."""
    if not isinstance(path, str) or not path:
        raise ApiError(422, f"{what} must be a non-empty string")
    if "\x00" in path:
        raise ApiError(422, f"{what} contains a NUL byte")
    if path.startswith("/"):
        raise ApiError(422, f"{what} must be relative: {path!r}")
    pure = PurePosixPath(path)
    if ".." in pure.parts:
        raise ApiError(422, f"{what} escapes its directory: {path!r}")
    if pure.as_posix() != path or len(path) > 4096:
        raise ApiError(422, f"{what} is not normalised: {path!r}")
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write a temp file beside `path`, fsync it, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
