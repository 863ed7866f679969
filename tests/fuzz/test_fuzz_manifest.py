"""Fuzz the manifest path: validation, the allowlist check, identity and signatures.

Properties: parse_manifest either returns a Manifest whose invariants hold or raises
JobFailure(E_INVALID); Allowlist.check returns an entry only for a clean argv/env and
otherwise raises Denied; job_identity and signature verification never raise anything
but JobFailure(E_SIGNATURE). No other exception type may ever escape.
"""

from __future__ import annotations

import base64
import posixpath
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import event, given
from hypothesis import strategies as st

from aitbc_miner.allowlist import Allowlist, Denied, load_allowlist
from aitbc_miner.errors import ErrorCode, JobFailure
from aitbc_miner.manifest import JOB_ID_RE, TASK_RE, Signature, job_identity, parse_manifest
from aitbc_miner.runners.cli import build_argv
from aitbc_miner.security import SignatureVerifier, canonical_bytes
from tests.fuzz.profile import budget, seen
from tests.fuzz.strategies import any_manifest, cli_like, manifests, text

REPO = Path(__file__).resolve().parents[2]
RESERVED_PREFIXES = ("LD_", "PYTHON", "AITBC_", "LC_")


@pytest.fixture(scope="module")
def allowlist() -> Allowlist:
    return load_allowlist([str(REPO / "allowlist.d" / "*.yaml")])


def assert_clean_path(path: str) -> None:
    assert path and not path.startswith("/") and "\x00" not in path and "\\" not in path
    assert posixpath.normpath(path) == path and ".." not in path.split("/")


@budget(weight=1.0)
@given(any_manifest)
def test_parse_manifest_accepts_only_sound_manifests(raw: Any) -> None:
    seen("manifest")
    try:
        m = parse_manifest(raw)
    except JobFailure as failure:
        assert failure.code is ErrorCode.INVALID
        assert failure.retryable is False
        assert isinstance(failure.message, str) and failure.message
        event("E_INVALID")
        return
    event(f"valid {m.runner} manifest")
    assert JOB_ID_RE.fullmatch(m.job_id)
    assert m.attempt >= 1 and 1 <= m.timeout_s
    for url in m.inputs.urls:
        assert url.url.lower().startswith(("http://", "https://"))
        assert_clean_path(url.path)
    for rel in m.inputs.inline:
        assert_clean_path(rel)
    for spec in m.artifacts:
        assert_clean_path(spec.path)
    if m.runner == "cli":
        assert m.command
    else:
        assert m.task is not None and TASK_RE.fullmatch(m.task)


@budget(weight=1.0)
@given(raw=cli_like)
def test_allowlist_check_denies_or_yields_a_clean_argv(raw: dict[str, Any], allowlist) -> None:
    seen("allowlist-check")
    command, args, env = raw.get("command"), raw.get("args", []), raw.get("env", {})
    try:
        entry = allowlist.check(command, args, env, max_args=256)  # type: ignore[arg-type]
    except Denied as denied:
        assert isinstance(denied.reason, str) and len(denied.reason) < 400
        event("denied")
        return
    event(f"allowed: {entry.name}")
    argv = build_argv(entry, args)
    assert Path(argv[0]).is_absolute() and argv[0] == entry.path
    assert all(isinstance(a, str) and "\x00" not in a for a in argv)
    assert len(args) <= 256
    for key, value in env.items():
        assert isinstance(value, str) and "\x00" not in value
        assert key.upper() not in ("PATH", "HOME", "LANG", "TMPDIR")
        assert not key.upper().startswith(RESERVED_PREFIXES)


KEY = Ed25519PrivateKey.generate()
VERIFIER = SignatureVerifier.from_config(
    {"k1": base64.b64encode(KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))
     .decode()},
    {"h1": "secret"},
    require_signed=True,
)  # fmt: skip
NOW = datetime(2025, 9, 26, tzinfo=UTC)

signatures = st.one_of(
    st.none(),
    st.builds(
        Signature,
        key_id=st.one_of(st.sampled_from(["k1", "h1", "k2", ""]), text),
        alg=st.one_of(st.sampled_from(["ed25519", "hmac-sha256", "none", "ED25519"]), text),
        value=st.one_of(
            st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()),
            text,
            st.just("=" * 8),
        ),
    ),
)


@budget(weight=1.0)
@given(st.one_of(manifests, cli_like), signatures, st.booleans())
def test_identity_and_signature_checks_never_raise_foreign_errors(
    raw: dict[str, Any], signature: Signature | None, sign_for_real: bool
) -> None:
    seen("signature")
    ident = job_identity(raw)
    if ident is not None:
        job_id, attempt = ident
        assert isinstance(job_id, str) and 0 < len(job_id) <= 512 and attempt >= 1
    if sign_for_real:
        value = base64.b64encode(KEY.sign(canonical_bytes(raw))).decode()
        signature = Signature(key_id="k1", alg="ed25519", value=value)
    try:
        VERIFIER.verify(raw, signature, node_id="node-fuzz", now=NOW)
    except JobFailure as failure:
        assert failure.code is ErrorCode.SIGNATURE and failure.retryable is False
        assert len(failure.message) < 300
        event("E_SIGNATURE")
        return
    event("verified")
    # Only a real signature over these very bytes, bound to nobody else, gets through.
    assert sign_for_real
    assert raw.get("node_id") in (None, "node-fuzz")
