"""Config value types: durations, listen addresses, paths, keys and the checks behind them.

For: the scalar parsers (:func:`parse_duration`, :func:`split_host_port`) and the
``Annotated`` types the section models are built from, each failing with a ValueError
whose text is the reason shown after ``section.key:``.
Pure, except that ``TlsVerify`` checks that a CA bundle path names an existing file.
Must not: echo a secret's value in an error.
"""

import base64
import binascii
import ipaddress
import math
import os
import re
from pathlib import Path
from typing import Annotated

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import AfterValidator, BeforeValidator, Field, PlainValidator, SecretStr

NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)")
_DURATION_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_BOOL_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_duration(value: object) -> float:
    """Seconds as a float from ``30``, ``1.5``, ``"30"``, ``"30s"``, ``"15m"``, ``"24h"``, ``"7d"``.

    Raises ValueError naming the value otherwise (bools, negatives-as-text, units like "ms").
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip().lower())
        if match:
            seconds = float(match[1]) * _DURATION_UNIT_S[match[2]]
    if seconds is None or not math.isfinite(seconds):
        raise ValueError(f"invalid duration {_short(value)} (use seconds or 30s/15m/24h/7d)")
    return seconds


def split_host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError when malformed."""
    bad = ValueError('must be "" or host:port / [v6]:port with port 0..65535')
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    else:
        host, sep, port = value.rpartition(":")
        if not host or ":" in host or any(c.isspace() for c in host):
            raise bad
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise bad
    return host, int(port)


def _check_listen(value: str) -> str:
    if value:
        split_host_port(value)
    return value


def _check_node_id(value: str) -> str:
    if not NODE_ID_RE.fullmatch(value):
        raise ValueError(f"must match ^{NODE_ID_RE.pattern}$")
    return value


def _check_abs_path(value: object) -> object:
    if isinstance(value, str | Path) and (not str(value) or not os.path.isabs(value)):
        raise ValueError(
            "must be a non-empty absolute path (relative ones resolve against "
            "the config file's directory)"
        )
    return value


def _check_sha256(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError("must be a sha256 as 64 lowercase hex characters")
    return value


def _check_ed25519_b64(value: str) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64 (expected a raw 32-byte ed25519 public key)") from None
    if len(raw) != 32:
        raise ValueError(f"decodes to {len(raw)} bytes; an ed25519 public key is 32 raw bytes")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ValueError("not a valid ed25519 public key") from None
    return value


def _check_secret(value: SecretStr) -> SecretStr:
    if not value.get_secret_value():
        raise ValueError("must not be empty")
    return value


def _tls_verify(value: object) -> bool | str:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    if isinstance(value, str) and value:
        if not os.path.isfile(value):
            raise ValueError("CA bundle file not found (use true, false or a CA bundle path)")
        return value
    raise ValueError("must be true, false or a path to a CA bundle file")


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _yaml_off(value: object) -> object:
    return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


Duration = Annotated[float, BeforeValidator(parse_duration)]
Secret = Annotated[SecretStr, AfterValidator(_check_secret)]
AbsPath = Annotated[Path, BeforeValidator(_check_abs_path)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
NodeId = Annotated[str, AfterValidator(_check_node_id)]
Sha256Hex = Annotated[str, AfterValidator(_check_sha256)]
Ed25519KeyB64 = Annotated[str, AfterValidator(_check_ed25519_b64)]
TlsVerify = Annotated[bool | str, PlainValidator(_tls_verify)]
