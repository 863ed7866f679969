"""Manifest signature verification (PROTOCOL.md "Signatures").

Pure: keys come from config, the clock is passed in. Public keys are pinned in
config by key_id and never taken from the coordinator. Every rejection is a
JobFailure(E_SIGNATURE) with a reason that is safe to send back.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .errors import ErrorCode, JobFailure
from .manifest import Signature


def canonical_bytes(job: Mapping[str, object]) -> bytes:
    """The exact bytes a signature covers."""
    return json.dumps(job, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


@dataclass(frozen=True)
class SignatureVerifier:
    """Verifies `job` against `signature` with pinned keys."""

    ed25519_keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    hmac_keys: Mapping[str, bytes] = field(default_factory=dict)
    require_signed: bool = True

    @classmethod
    def from_config(
        cls, manifest_keys: Mapping[str, str], hmac_keys: Mapping[str, str], require_signed: bool
    ) -> SignatureVerifier:
        return cls(
            ed25519_keys={
                key_id: Ed25519PublicKey.from_public_bytes(base64.b64decode(value, validate=True))
                for key_id, value in manifest_keys.items()
            },
            hmac_keys={key_id: secret.encode("utf-8") for key_id, secret in hmac_keys.items()},
            require_signed=require_signed,
        )

    def verify(
        self, job: Mapping[str, object], signature: Signature | None, *, node_id: str, now: datetime
    ) -> None:
        """Raise JobFailure(E_SIGNATURE) unless the job may run on this node now."""
        if signature is None:
            if self.require_signed:
                raise _reject("manifest is not signed")
            return
        payload = canonical_bytes(job)
        try:
            sig = base64.b64decode(signature.value, validate=True)
        except (binascii.Error, ValueError):
            raise _reject("signature value is not valid base64") from None
        if signature.alg == "ed25519":
            key = self.ed25519_keys.get(signature.key_id)
            if key is None:
                raise _reject(f"unknown ed25519 key_id {signature.key_id[:64]!r}")
            try:
                key.verify(sig, payload)
            except InvalidSignature:
                raise _reject("ed25519 signature does not match the manifest") from None
        elif signature.alg == "hmac-sha256":
            secret = self.hmac_keys.get(signature.key_id)
            if secret is None:
                raise _reject(f"unknown hmac key_id {signature.key_id[:64]!r}")
            expected = hmac.new(secret, payload, hashlib.sha256).digest()
            if not hmac.compare_digest(expected, sig):
                raise _reject("hmac-sha256 signature does not match the manifest")
        else:
            raise _reject(f"unsupported signature alg {signature.alg[:32]!r}")
        _check_binding(job, node_id=node_id, now=now)


def _check_binding(job: Mapping[str, object], *, node_id: str, now: datetime) -> None:
    """Signed `node_id` / `not_after` fields bind a job to a node and a time."""
    target = job.get("node_id")
    if target is not None and target != node_id:
        raise _reject("manifest is addressed to another node")
    not_after = job.get("not_after")
    if not_after is not None:
        if not isinstance(not_after, str):
            raise _reject("not_after must be an RFC 3339 string")
        try:
            deadline = datetime.fromisoformat(not_after.replace("Z", "+00:00"))
        except ValueError:
            raise _reject("not_after is not an RFC 3339 timestamp") from None
        if deadline.tzinfo is None:
            deadline = deadline.replace(tzinfo=UTC)
        if now > deadline:
            raise _reject("manifest expired (not_after has passed)")


def _reject(reason: str) -> JobFailure:
    return JobFailure(ErrorCode.SIGNATURE, reason)
