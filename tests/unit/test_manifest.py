"""Manifest and coordinator-reply validation: table-driven, plus a hypothesis property."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aitbc_miner.errors import ErrorCode, JobFailure
from aitbc_miner.manifest import (
    HeartbeatReply,
    Lease,
    Manifest,
    ProgressReply,
    PullReply,
    RegisterReply,
    UploadStarted,
    UploadStatus,
    check_rel_path,
    job_identity,
    parse_manifest,
)

SHA = "a" * 64


def cli(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "job_id": "j-20250926-001",
        "runner": "cli",
        "timeout_s": 60,
        "command": "ffmpeg",
    }
    base.update(extra)
    return base


def py(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"job_id": "p1", "runner": "python", "timeout_s": 60, "task": "example"}
    base.update(extra)
    return base


FULL_EXAMPLE = {
    "job_id": "j-20250926-001",
    "attempt": 1,
    "runner": "cli",
    "requirements": {"gpu": True, "gpu_count": 1, "vram_mb": 12000, "cpu_threads": 4,
                     "mem_mb": 8192},
    "timeout_s": 3600,
    "input": {"urls": [{"url": "https://example.org/input1.mp4", "path": "input1.mp4",
                        "sha256": SHA, "max_mb": 500}],
              "inline": {"params.txt": "text content"}},
    "command": "ffmpeg",
    "args": ["-y", "-i", "input1.mp4", "-c:v", "libx264", "output.mp4"],
    "task": None,
    "params": None,
    "env": {"OMP_NUM_THREADS": "4"},
    "artifacts": [{"path": "output.mp4", "type": "video/mp4", "max_mb": 5000}],
}  # fmt: skip


def test_protocol_example_parses() -> None:
    m = parse_manifest(copy.deepcopy(FULL_EXAMPLE))
    assert m.job_id == "j-20250926-001"
    assert m.requirements.gpu is True and m.requirements.vram_mb == 12000
    assert m.inputs.urls[0].path == "input1.mp4"
    assert m.inputs.inline == {"params.txt": "text content"}
    assert m.artifacts[0].path == "output.mp4" and m.artifacts[0].max_mb == 5000
    assert m.env == {"OMP_NUM_THREADS": "4"}


def test_defaults_for_optional_fields() -> None:
    m = parse_manifest(cli())
    assert m.attempt == 1
    assert m.args == [] and m.env == {} and m.artifacts == []
    assert m.input is None and m.inputs.urls == [] and m.inputs.inline == {}
    assert m.requirements.gpu is False and m.requirements.gpu_count == 1
    assert m.task_params == {}


def test_python_runner_params() -> None:
    m = parse_manifest(py(params={"n": 3, "nested": {"a": [1, 2]}}))
    assert m.runner == "python" and m.task == "example"
    assert m.task_params == {"n": 3, "nested": {"a": [1, 2]}}


VALID: list[tuple[str, dict[str, Any]]] = [
    ("job_id single char", cli(job_id="a")),
    ("job_id 128 chars", cli(job_id="a" * 128)),
    ("job_id dots dashes underscores", cli(job_id="A0._-x")),
    ("unknown top-level fields ignored", cli(future_field={"x": 1}, priority=5)),
    ("unknown nested fields ignored", cli(requirements={"gpu": False, "tpu": True},
                                         artifacts=[{"path": "o.txt", "new": 1}])),
    ("nested artifact path", cli(artifacts=[{"path": "sub/dir/o.txt"}])),
    ("dotfile artifact", cli(artifacts=[{"path": ".hidden"}])),
    ("dash inside a component", cli(artifacts=[{"path": "a-b/c-d.txt"}])),
    ("http input", cli(input={"urls": [{"url": "http://x.test/a", "path": "a"}]})),
    ("HTTPS upper-case scheme", cli(input={"urls": [{"url": "HTTPS://x.test/a", "path": "a"}]})),
    ("python dotted task", py(task="pkg.sub.mod")),
    ("attempt 7", cli(attempt=7)),
    ("max timeout", cli(timeout_s=30 * 24 * 3600)),
    ("256 artifacts", cli(artifacts=[{"path": f"o{i}"} for i in range(256)])),
    ("4096 args", cli(args=["x"] * 4096)),
    ("255-char path", cli(artifacts=[{"path": "a" * 255}])),
    ("explicit nulls for optionals", cli(task=None, params=None, input=None)),
]  # fmt: skip


@pytest.mark.parametrize("raw", [v for _, v in VALID], ids=[n for n, _ in VALID])
def test_valid_manifests(raw: dict[str, Any]) -> None:
    m = parse_manifest(raw)
    assert isinstance(m, Manifest)
    assert m.job_id == raw["job_id"]


def test_unknown_fields_are_not_kept() -> None:
    m = parse_manifest(cli(future_field=1))
    assert "future_field" not in m.model_dump()


# (name, raw manifest, a word the failure message must contain)
INVALID: list[tuple[str, Any, str]] = [
    ("job_id leading dot", cli(job_id=".hidden"), "job_id"),
    ("job_id leading dash", cli(job_id="-x"), "job_id"),
    ("job_id slash", cli(job_id="a/b"), "job_id"),
    ("job_id space", cli(job_id="a b"), "job_id"),
    ("job_id empty", cli(job_id=""), "job_id"),
    ("job_id 129 chars", cli(job_id="a" * 129), "job_id"),
    ("job_id trailing newline", cli(job_id="abc\n"), "job_id"),
    ("job_id non-ascii", cli(job_id="jöb"), "job_id"),
    ("job_id int", cli(job_id=5), "job_id"),
    ("job_id dotdot", cli(job_id=".."), "job_id"),
    ("missing job_id", {k: v for k, v in cli().items() if k != "job_id"}, "job_id"),
    ("missing runner", {k: v for k, v in cli().items() if k != "runner"}, "runner"),
    ("unknown runner", cli(runner="docker"), "runner"),
    ("missing timeout_s", {k: v for k, v in cli().items() if k != "timeout_s"}, "timeout_s"),
    ("timeout_s string", cli(timeout_s="5"), "timeout_s"),
    ("timeout_s bool", cli(timeout_s=True), "timeout_s"),
    ("timeout_s float", cli(timeout_s=5.0), "timeout_s"),
    ("timeout_s zero", cli(timeout_s=0), "timeout_s"),
    ("timeout_s too large", cli(timeout_s=30 * 24 * 3600 + 1), "timeout_s"),
    ("attempt zero", cli(attempt=0), "attempt"),
    ("attempt bool", cli(attempt=True), "attempt"),
    ("attempt string", cli(attempt="1"), "attempt"),
    ("cli without command", {k: v for k, v in cli().items() if k != "command"}, "command"),
    ("cli with empty command", cli(command=""), "command"),
    ("command not a string", cli(command=["ffmpeg"]), "command"),
    ("python without task", {k: v for k, v in py().items() if k != "task"}, "task"),
    ("python task with slash", py(task="a/b"), "task"),
    ("python task leading digit", py(task="1abc"), "task"),
    ("params not an object", py(params=[1, 2]), "params"),
    ("args not a list", cli(args="-y"), "args"),
    ("args item int", cli(args=["-y", 5]), "args"),
    ("env value int", cli(env={"A": 1}), "env"),
    ("env not an object", cli(env=["A=1"]), "env"),
    ("requirements gpu string", cli(requirements={"gpu": "yes"}), "requirements.gpu"),
    ("requirements gpu int", cli(requirements={"gpu": 1}), "requirements.gpu"),
    ("requirements vram bool", cli(requirements={"vram_mb": True}), "requirements.vram_mb"),
    ("requirements gpu_count 0", cli(requirements={"gpu_count": 0}), "gpu_count"),
    ("requirements not object", cli(requirements=[]), "requirements"),
    ("artifacts not a list", cli(artifacts={"path": "o"}), "artifacts"),
    ("artifact dotdot", cli(artifacts=[{"path": "../o"}]), "artifacts.0.path"),
    ("artifact inner dotdot", cli(artifacts=[{"path": "a/../../o"}]), "artifacts.0.path"),
    ("artifact bare dotdot", cli(artifacts=[{"path": ".."}]), "artifacts.0.path"),
    ("artifact dot", cli(artifacts=[{"path": "."}]), "artifacts.0.path"),
    ("artifact absolute", cli(artifacts=[{"path": "/etc/passwd"}]), "artifacts.0.path"),
    ("artifact NUL", cli(artifacts=[{"path": "o\x00.txt"}]), "artifacts.0.path"),
    ("artifact backslash", cli(artifacts=[{"path": "a\\b"}]), "artifacts.0.path"),
    ("artifact double slash", cli(artifacts=[{"path": "a//b"}]), "artifacts.0.path"),
    ("artifact ./ prefix", cli(artifacts=[{"path": "./o"}]), "artifacts.0.path"),
    ("artifact trailing slash", cli(artifacts=[{"path": "dir/"}]), "artifacts.0.path"),
    ("artifact leading dash", cli(artifacts=[{"path": "-rf"}]), "artifacts.0.path"),
    ("artifact dash component", cli(artifacts=[{"path": "a/-b"}]), "artifacts.0.path"),
    ("artifact empty path", cli(artifacts=[{"path": ""}]), "artifacts.0.path"),
    ("artifact 256-char path", cli(artifacts=[{"path": "a" * 256}]), "artifacts.0.path"),
    ("artifact path int", cli(artifacts=[{"path": 3}]), "artifacts.0.path"),
    ("artifact missing path", cli(artifacts=[{"type": "text/plain"}]), "artifacts.0.path"),
    ("artifact max_mb string", cli(artifacts=[{"path": "o", "max_mb": "5"}]), "max_mb"),
    ("duplicate artifacts", cli(artifacts=[{"path": "o"}, {"path": "o"}]), "artifact"),
    ("input url path dotdot",
     cli(input={"urls": [{"url": "https://x/a", "path": "../a"}]}), "input.urls.0.path"),
    ("input url path absolute",
     cli(input={"urls": [{"url": "https://x/a", "path": "/a"}]}), "input.urls.0.path"),
    ("input url path leading dash",
     cli(input={"urls": [{"url": "https://x/a", "path": "-a"}]}), "input.urls.0.path"),
    ("input url path backslash",
     cli(input={"urls": [{"url": "https://x/a", "path": "a\\b"}]}), "input.urls.0.path"),
    ("inline path dotdot", cli(input={"inline": {"../p.txt": "x"}}), "input.inline"),
    ("inline path absolute", cli(input={"inline": {"/p.txt": "x"}}), "input.inline"),
    ("inline path NUL", cli(input={"inline": {"p\x00": "x"}}), "input.inline"),
    ("inline path non-normalised", cli(input={"inline": {"a/./p": "x"}}), "input.inline"),
    ("inline value int", cli(input={"inline": {"p.txt": 5}}), "input.inline"),
    ("input url file scheme",
     cli(input={"urls": [{"url": "file:///etc/passwd", "path": "a"}]}), "input"),
    ("input url ftp", cli(input={"urls": [{"url": "ftp://x/a", "path": "a"}]}), "input"),
    ("input url no scheme", cli(input={"urls": [{"url": "x.test/a", "path": "a"}]}), "input"),
    ("input url sha256 upper",
     cli(input={"urls": [{"url": "https://x/a", "path": "a", "sha256": "A" * 64}]}), "sha256"),
    ("input url sha256 short",
     cli(input={"urls": [{"url": "https://x/a", "path": "a", "sha256": "ab"}]}), "sha256"),
    ("duplicate input url paths",
     cli(input={"urls": [{"url": "https://x/a", "path": "a"},
                         {"url": "https://x/b", "path": "a"}]}), "input"),
    ("url path collides with inline",
     cli(input={"urls": [{"url": "https://x/a", "path": "a"}], "inline": {"a": "x"}}), "input"),
    ("inline over 4 MiB", cli(input={"inline": {"a": "x" * (4 * 1024 * 1024 + 1)}}), "input"),
    ("input not an object", cli(input="https://x/a"), "input"),
    ("too many artifacts", cli(artifacts=[{"path": f"o{i}"} for i in range(257)]), "artifacts"),
    ("too many args", cli(args=["x"] * 4097), "args"),
    ("too many env keys", cli(env={f"K{i}": "v" for i in range(257)}), "env"),
    ("too many url inputs",
     cli(input={"urls": [{"url": "https://x/a", "path": f"p{i}"} for i in range(257)]}),
     "input.urls"),
    ("too many inline inputs", cli(input={"inline": {f"p{i}": "" for i in range(257)}}),
     "input.inline"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "field"), [(r, f) for _, r, f in INVALID], ids=[n for n, _, _ in INVALID]
)
def test_invalid_manifests(raw: Any, field: str) -> None:
    with pytest.raises(JobFailure) as info:
        parse_manifest(raw)
    assert info.value.code is ErrorCode.INVALID
    assert info.value.retryable is False
    assert field in info.value.message, info.value.message
    assert "\n" not in info.value.message  # one line, safe to report


@pytest.mark.parametrize("raw", [None, [], "job", 5, 1.5, True, [cli()]])
def test_non_object_manifest(raw: Any) -> None:
    with pytest.raises(JobFailure) as info:
        parse_manifest(raw)
    assert info.value.code is ErrorCode.INVALID
    assert "object" in info.value.message


def test_many_errors_are_summarised() -> None:
    raw = {"job_id": "", "runner": 1, "timeout_s": "x", "args": 1, "env": 1, "artifacts": 1,
           "attempt": "x"}  # fmt: skip
    with pytest.raises(JobFailure) as info:
        parse_manifest(raw)
    assert "more)" in info.value.message


@pytest.mark.parametrize(
    "path",
    ["a", "a.b", "dir/file", ".hidden", "a..b", "x" * 255],
)
def test_check_rel_path_accepts(path: str) -> None:
    assert check_rel_path(path) == path


@pytest.mark.parametrize(
    "path",
    ["", "/a", "../a", "a/..", "a/../b", "..", ".", "./a", "a/.", "a//b", "a/", "a\\b",
     "a\x00", "-a", "a/-b", "x" * 256],
)  # fmt: skip
def test_check_rel_path_rejects(path: str) -> None:
    with pytest.raises(ValueError):
        check_rel_path(path)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"job_id": "j1", "attempt": 3}, ("j1", 3)),
        ({"job_id": "j1"}, ("j1", 1)),
        ({"job_id": "not/valid but reportable", "attempt": 2}, ("not/valid but reportable", 2)),
        ({"job_id": "j1", "attempt": 0}, ("j1", 1)),
        ({"job_id": "j1", "attempt": -4}, ("j1", 1)),
        ({"job_id": "j1", "attempt": True}, ("j1", 1)),
        ({"job_id": "j1", "attempt": "2"}, ("j1", 1)),
        ({"job_id": "j1", "attempt": 2.0}, ("j1", 1)),
        ({"job_id": "x" * 512}, ("x" * 512, 1)),
        ({"job_id": "x" * 513}, None),
        ({"job_id": ""}, None),
        ({"job_id": 5}, None),
        ({"job_id": None}, None),
        ({}, None),
        (None, None),
        (["j1"], None),
        ("j1", None),
    ],
)
def test_job_identity(raw: Any, expected: tuple[str, int] | None) -> None:
    assert job_identity(raw) == expected


# -- coordinator replies -------------------------------------------------------------


def test_register_reply_ok() -> None:
    r = RegisterReply.model_validate({"node_token": "t", "status": "pending",
                                      "heartbeat_interval_s": 15, "extra": 1})  # fmt: skip
    assert r.node_token == "t" and r.status == "pending" and r.heartbeat_interval_s == 15


@pytest.mark.parametrize(
    ("model", "data"),
    [
        (RegisterReply, {}),
        (RegisterReply, {"node_token": ""}),
        (RegisterReply, {"node_token": None}),
        (RegisterReply, {"node_token": "t", "status": "disabled"}),
        (RegisterReply, {"node_token": "t", "heartbeat_interval_s": 0}),
        (RegisterReply, {"node_token": "t", "heartbeat_interval_s": 99999}),
        (HeartbeatReply, {"status": "bogus"}),
        (HeartbeatReply, {"cancel": "j1"}),
        (HeartbeatReply, {"cancel": [1, 2]}),
        (PullReply, {"job": [1]}),
        (PullReply, {"job": "j"}),
        (PullReply, {"job": {}, "lease": {"lease_id": ""}}),
        (PullReply, {"job": {}, "lease": "l1"}),
        (PullReply, {"signature": {"key_id": "k"}}),
        (Lease, {}),
        (ProgressReply, {"cancel": "maybe"}),
        (UploadStarted, {"upload_id": "u", "chunk_size": 0, "received": 0}),
        (UploadStarted, {"upload_id": "u", "chunk_size": 10, "received": -1}),
        (UploadStarted, {"chunk_size": 10, "received": 0}),
        (UploadStatus, {}),
        (UploadStatus, {"received": -1}),
    ],
)
def test_replies_reject_wrong_shapes(model: type, data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        model.model_validate(data)


def test_pull_reply_empty_and_full() -> None:
    empty = PullReply.model_validate({"job": None, "lease": None, "signature": None})
    assert empty.job is None and empty.lease is None and empty.signature is None
    full = PullReply.model_validate(
        {
            "job": cli(),
            "lease": {"lease_id": "l1", "expires_at": "2030-01-01T00:00:00Z"},
            "signature": {"key_id": "k1", "alg": "ed25519", "value": "AAAA"},
        }
    )
    assert full.job == cli() and full.lease is not None and full.lease.lease_id == "l1"
    assert full.signature is not None and full.signature.alg == "ed25519"


def test_heartbeat_reply_defaults() -> None:
    r = HeartbeatReply.model_validate({})
    assert r.status == "active" and r.cancel == []


# -- property: anything JSON-like fails only as JobFailure(E_INVALID) -----------------

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_like = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                  max_size=4),
    max_leaves=20,
)  # fmt: skip
FIELD_NAMES = ["job_id", "attempt", "runner", "requirements", "timeout_s", "input", "command",
               "args", "task", "params", "env", "artifacts"]  # fmt: skip
# Biased towards manifest-shaped objects so validation gets past the first field.
manifest_like = st.fixed_dictionaries(
    {},
    optional={name: json_like for name in FIELD_NAMES}
    | {"runner": st.sampled_from(["cli", "python", "x"]),
       "job_id": st.text(max_size=8) | st.just("j1")},
).map(lambda d: {**cli(), **d})  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_like, manifest_like))
def test_parse_manifest_only_raises_invalid(raw: Any) -> None:
    try:
        m = parse_manifest(raw)
    except JobFailure as exc:
        assert exc.code is ErrorCode.INVALID
        assert exc.message
    else:
        assert isinstance(raw, dict) and m.job_id == raw["job_id"]
