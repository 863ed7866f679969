"""Manifest signing for the mock: the persistent Ed25519 key, HMAC, and the deliberately
broken modes tests use to check that a miner refuses bad signatures."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .common import canonical

SIGN_MODES = ("ed25519", "hmac", "none", "bad", "tamper", "unknown-key")
ED25519_KEY_ID = "mock-ed25519"
HMAC_KEY_ID = "mock-hmac"
UNKNOWN_KEY_ID = "mock-unknown"


def load_or_create_key(path: Path | None) -> Ed25519PrivateKey:
    """Load a raw 32-byte or PEM key from `path`, or create it there (mode 0600)."""
    if path is None:
        return Ed25519PrivateKey.generate()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        return key
    if data.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return key
    if len(data) == 32:
        return Ed25519PrivateKey.from_private_bytes(data)
    raise ValueError(f"{path}: expected a PEM or raw 32-byte Ed25519 private key")


def public_key_b64(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def tampered(job: dict[str, Any]) -> dict[str, Any]:
    """A copy of `job` changed after signing: timeout_s + 1, or an extra field."""
    changed = copy.deepcopy(job)
    timeout = changed.get("timeout_s")
    if isinstance(timeout, int) and not isinstance(timeout, bool):
        changed["timeout_s"] = timeout + 1
    else:
        changed["x_tampered"] = True
    return changed


class Signer:
    """Signs the exact job object that goes on the wire, in one of SIGN_MODES."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        hmac_secret: str | None = None,
        key_id: str = ED25519_KEY_ID,
    ) -> None:
        self.key = key
        self.key_id = key_id
        self.public_key = public_key_b64(key)
        self.hmac_secret = hmac_secret.encode() if hmac_secret is not None else None
        self._stranger = Ed25519PrivateKey.generate()

    def sign(self, job: dict[str, Any], mode: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Return (job to send, signature object or None)."""
        payload = canonical(job)
        if mode == "none":
            return job, None
        if mode == "hmac":
            if self.hmac_secret is None:
                raise ValueError("sign mode 'hmac' needs --hmac-secret")
            digest = hmac.new(self.hmac_secret, payload, hashlib.sha256).digest()
            return job, _sig(HMAC_KEY_ID, "hmac-sha256", digest)
        if mode == "ed25519":
            return job, _sig(self.key_id, "ed25519", self.key.sign(payload))
        if mode == "bad":  # well-formed 64 bytes, but over different bytes
            return job, _sig(self.key_id, "ed25519", self.key.sign(payload + b" "))
        if mode == "unknown-key":
            return job, _sig(UNKNOWN_KEY_ID, "ed25519", self._stranger.sign(payload))
        if mode == "tamper":
            return tampered(job), _sig(self.key_id, "ed25519", self.key.sign(payload))
        raise ValueError(f"unknown sign mode {mode!r}")


def _sig(key_id: str, alg: str, value: bytes) -> dict[str, Any]:
    return {"key_id": key_id, "alg": alg, "value": base64.b64encode(value).decode()}
