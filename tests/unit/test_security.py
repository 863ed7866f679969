"""Manifest signature verification with real ed25519 keys and HMAC secrets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from aitbc_miner.errors import ErrorCode, JobFailure
from aitbc_miner.manifest import Signature
from aitbc_miner.security import SignatureVerifier, canonical_bytes

NOW = datetime(2025, 9, 26, 12, 0, tzinfo=UTC)
NODE = "node-abc123"


def job(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job_id": "j-1",
        "runner": "cli",
        "timeout_s": 60,
        "command": "ffmpeg",
        "args": ["-i", "input1.mp4", "out.mp4"],
        "env": {"OMP_NUM_THREADS": "4"},
    }
    base.update(extra)
    return base


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pub_b64(key: Ed25519PrivateKey) -> str:
    return b64(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def ed_sign(key: Ed25519PrivateKey, key_id: str, payload: dict[str, Any]) -> Signature:
    return Signature(key_id=key_id, alg="ed25519", value=b64(key.sign(canonical_bytes(payload))))


def hmac_sign(secret: bytes, key_id: str, payload: dict[str, Any]) -> Signature:
    digest = hmac.new(secret, canonical_bytes(payload), hashlib.sha256).digest()
    return Signature(key_id=key_id, alg="hmac-sha256", value=b64(digest))


@pytest.fixture(scope="module")
def key1() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def key2() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def verifier(key1: Ed25519PrivateKey, key2: Ed25519PrivateKey) -> SignatureVerifier:
    return SignatureVerifier.from_config(
        {"k1": pub_b64(key1), "k2": pub_b64(key2)},
        {"h1": "shared-secret"},
        require_signed=True,
    )


def rejected(exc_info: pytest.ExceptionInfo[JobFailure], word: str) -> None:
    assert exc_info.value.code is ErrorCode.SIGNATURE
    assert word in exc_info.value.message, exc_info.value.message


def test_signed_job_verifies(verifier: SignatureVerifier, key1: Ed25519PrivateKey) -> None:
    j = job()
    verifier.verify(j, ed_sign(key1, "k1", j), node_id=NODE, now=NOW)


def test_unsigned_rejected_when_required(verifier: SignatureVerifier) -> None:
    with pytest.raises(JobFailure) as info:
        verifier.verify(job(), None, node_id=NODE, now=NOW)
    rejected(info, "not signed")
    assert info.value.retryable is False


def test_unsigned_allowed_when_not_required() -> None:
    lax = SignatureVerifier(require_signed=False)
    lax.verify(job(), None, node_id=NODE, now=NOW)


def test_signature_still_checked_when_not_required(key1: Ed25519PrivateKey) -> None:
    # Optional signing must not mean "a bad signature is ignored".
    lax = SignatureVerifier.from_config({"k1": pub_b64(key1)}, {}, require_signed=False)
    other = Ed25519PrivateKey.generate()
    j = job()
    with pytest.raises(JobFailure) as info:
        lax.verify(j, ed_sign(other, "k1", j), node_id=NODE, now=NOW)
    rejected(info, "does not match")


def test_unknown_ed25519_key_id(verifier: SignatureVerifier, key1: Ed25519PrivateKey) -> None:
    j = job()
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, ed_sign(key1, "k9", j), node_id=NODE, now=NOW)
    rejected(info, "unknown ed25519 key_id")


@pytest.mark.parametrize("value", ["not base64!!", "AAA", "ÄÖÜ", "AA==AA"])
def test_bad_base64(verifier: SignatureVerifier, value: str) -> None:
    with pytest.raises(JobFailure) as info:
        verifier.verify(job(), Signature(key_id="k1", alg="ed25519", value=value),
                        node_id=NODE, now=NOW)  # fmt: skip
    rejected(info, "base64")


def test_wrong_signature_bytes(verifier: SignatureVerifier) -> None:
    sig = Signature(key_id="k1", alg="ed25519", value=b64(b"\x00" * 64))
    with pytest.raises(JobFailure) as info:
        verifier.verify(job(), sig, node_id=NODE, now=NOW)
    rejected(info, "does not match")


def test_signature_of_other_key_under_this_key_id(
    verifier: SignatureVerifier, key2: Ed25519PrivateKey
) -> None:
    j = job()
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, ed_sign(key2, "k1", j), node_id=NODE, now=NOW)
    rejected(info, "does not match")


@pytest.mark.parametrize(
    "alter",
    [
        lambda j: j.update(command="rm"),
        lambda j: j["args"].append("-y"),
        lambda j: j["env"].update(LD_PRELOAD="/tmp/x.so"),
        lambda j: j.update(timeout_s=61),
        lambda j: j.update(extra_field=None),
        lambda j: j.pop("env"),
    ],
)
def test_field_altered_after_signing(
    verifier: SignatureVerifier, key1: Ed25519PrivateKey, alter: Any
) -> None:
    j = job()
    sig = ed_sign(key1, "k1", j)
    alter(j)
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, sig, node_id=NODE, now=NOW)
    rejected(info, "does not match")


def test_key_order_does_not_matter(verifier: SignatureVerifier, key1: Ed25519PrivateKey) -> None:
    j = job()
    sig = ed_sign(key1, "k1", j)
    reordered = dict(reversed(list(j.items())))
    verifier.verify(reordered, sig, node_id=NODE, now=NOW)


def test_key_rotation_either_pinned_key_works(
    verifier: SignatureVerifier, key1: Ed25519PrivateKey, key2: Ed25519PrivateKey
) -> None:
    j = job()
    verifier.verify(j, ed_sign(key1, "k1", j), node_id=NODE, now=NOW)
    verifier.verify(j, ed_sign(key2, "k2", j), node_id=NODE, now=NOW)
    with pytest.raises(JobFailure):
        verifier.verify(j, ed_sign(key1, "k2", j), node_id=NODE, now=NOW)


def test_hmac_good(verifier: SignatureVerifier) -> None:
    j = job()
    verifier.verify(j, hmac_sign(b"shared-secret", "h1", j), node_id=NODE, now=NOW)


def test_hmac_bad_secret(verifier: SignatureVerifier) -> None:
    j = job()
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, hmac_sign(b"wrong-secret", "h1", j), node_id=NODE, now=NOW)
    rejected(info, "hmac-sha256 signature does not match")


def test_hmac_altered_job(verifier: SignatureVerifier) -> None:
    j = job()
    sig = hmac_sign(b"shared-secret", "h1", j)
    j["command"] = "sh"
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, sig, node_id=NODE, now=NOW)
    rejected(info, "does not match")


def test_hmac_unknown_key(verifier: SignatureVerifier) -> None:
    j = job()
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, hmac_sign(b"shared-secret", "h9", j), node_id=NODE, now=NOW)
    rejected(info, "unknown hmac key_id")


def test_ed25519_key_id_is_not_an_hmac_key(verifier: SignatureVerifier) -> None:
    # An attacker must not be able to pick the alg to reach a different key table.
    j = job()
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, hmac_sign(b"anything", "k1", j), node_id=NODE, now=NOW)
    rejected(info, "unknown hmac key_id")


@pytest.mark.parametrize("alg", ["none", "rsa-sha256", "ED25519", ""])
def test_unsupported_alg(verifier: SignatureVerifier, key1: Ed25519PrivateKey, alg: str) -> None:
    j = job()
    good = ed_sign(key1, "k1", j)
    sig = Signature(key_id="k1", alg=alg, value=good.value)
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, sig, node_id=NODE, now=NOW)
    rejected(info, "unsupported signature alg")


def test_node_binding_other_node_rejected(
    verifier: SignatureVerifier, key1: Ed25519PrivateKey
) -> None:
    j = job(node_id="node-other")
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, ed_sign(key1, "k1", j), node_id=NODE, now=NOW)
    rejected(info, "another node")


def test_node_binding_same_node_ok(verifier: SignatureVerifier, key1: Ed25519PrivateKey) -> None:
    j = job(node_id=NODE)
    verifier.verify(j, ed_sign(key1, "k1", j), node_id=NODE, now=NOW)


@pytest.mark.parametrize(
    "not_after",
    [
        (NOW + timedelta(seconds=1)).isoformat(),
        (NOW + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "2025-09-26T12:00:00Z",  # exactly now: not yet passed
        "2025-09-26T14:00:00+02:00",  # same instant, other offset
        "2025-09-26T13:00:00",  # naive: read as UTC
    ],
)
def test_not_after_in_future_ok(
    verifier: SignatureVerifier, key1: Ed25519PrivateKey, not_after: str
) -> None:
    j = job(not_after=not_after)
    verifier.verify(j, ed_sign(key1, "k1", j), node_id=NODE, now=NOW)


@pytest.mark.parametrize(
    "not_after",
    [
        (NOW - timedelta(seconds=1)).isoformat(),
        "2025-09-26T11:59:59Z",
        "2025-09-26T13:59:59+02:00",
        "2020-01-01T00:00:00",
    ],
)
def test_not_after_passed_rejected(
    verifier: SignatureVerifier, key1: Ed25519PrivateKey, not_after: str
) -> None:
    j = job(not_after=not_after)
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, ed_sign(key1, "k1", j), node_id=NODE, now=NOW)
    rejected(info, "expired")


@pytest.mark.parametrize(
    ("not_after", "word"),
    [("tomorrow", "RFC 3339"), ("", "RFC 3339"), ("2025-13-45T00:00:00Z", "RFC 3339"),
     (1758888000, "string"), (["2030-01-01T00:00:00Z"], "string")],
)  # fmt: skip
def test_not_after_garbage_rejected(
    verifier: SignatureVerifier, key1: Ed25519PrivateKey, not_after: Any, word: str
) -> None:
    j = job(not_after=not_after)
    with pytest.raises(JobFailure) as info:
        verifier.verify(j, ed_sign(key1, "k1", j), node_id=NODE, now=NOW)
    rejected(info, word)


@pytest.mark.parametrize(
    "payload",
    [
        job(),
        job(note="vidéo ünïcödé 日本語 🎞", env={"Ä": "ß"}),
        {"z": 1, "a": {"y": [3, 2, 1], "b": None}, "m": True, "q": '"quoted" \\ / \n\t'},
        {},
    ],
)
def test_canonical_bytes_match_protocol(payload: dict[str, Any]) -> None:
    expected = json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    assert canonical_bytes(payload) == expected


def test_canonical_bytes_literal() -> None:
    assert canonical_bytes({"b": "é", "a": [1, {"d": 2, "c": None}]}) == (
        '{"a":[1,{"c":null,"d":2}],"b":"é"}'.encode()
    )


def test_non_ascii_job_signed_by_coordinator_convention_verifies(
    verifier: SignatureVerifier, key1: Ed25519PrivateKey
) -> None:
    j = job(note="日本語")
    raw = json.dumps(j, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    sig = Signature(key_id="k1", alg="ed25519", value=b64(key1.sign(raw)))
    verifier.verify(j, sig, node_id=NODE, now=NOW)
    # Signing the ASCII-escaped form instead must not verify.
    escaped = json.dumps(j, sort_keys=True, separators=(",", ":")).encode()
    bad = Signature(key_id="k1", alg="ed25519", value=b64(key1.sign(escaped)))
    with pytest.raises(JobFailure):
        verifier.verify(j, bad, node_id=NODE, now=NOW)
