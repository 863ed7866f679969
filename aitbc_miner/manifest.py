"""Pydantic models of the wire contract: the job manifest and coordinator replies.

Pure: validation only, no I/O. Manifests are validated strictly (a wrong type
is E_INVALID, never coerced) and ignore unknown fields (forward compatible).
Paths are checked here syntactically; the workspace re-checks them on disk.
"""

from __future__ import annotations

import posixpath
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from .errors import ErrorCode, JobFailure

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TASK_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,4}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_PATH_LEN = 255
MAX_ITEMS = 256
MAX_INLINE_BYTES = 4 * 1024 * 1024


def check_rel_path(path: str) -> str:
    """A relative, normalised path that stays inside its directory."""
    if not path or len(path) > MAX_PATH_LEN:
        raise ValueError("path must be 1..255 characters")
    if "\x00" in path or "\\" in path:
        raise ValueError("path contains a NUL byte or a backslash")
    if path.startswith("/"):
        raise ValueError("path must be relative")
    if posixpath.normpath(path) != path or path in (".", ".."):
        raise ValueError("path must be normalised (no '.', '..', '//' or trailing '/')")
    if ".." in path.split("/"):
        raise ValueError("path must not contain '..'")
    if any(part.startswith("-") for part in path.split("/")):
        raise ValueError("path components must not start with '-'")
    return path


RelPath = Annotated[StrictStr, AfterValidator(check_rel_path)]


def _sha256(value: str) -> str:
    if not SHA256_RE.fullmatch(value):
        raise ValueError("sha256 must be 64 lowercase hex characters")
    return value


Sha256 = Annotated[StrictStr, AfterValidator(_sha256)]


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Requirements(_Wire):
    gpu: StrictBool = False
    gpu_count: StrictInt = Field(default=1, ge=1, le=64)
    vram_mb: StrictInt = Field(default=0, ge=0)
    cpu_threads: StrictInt | None = Field(default=None, ge=1, le=4096)
    mem_mb: StrictInt | None = Field(default=None, ge=1)


class InputUrl(_Wire):
    url: StrictStr = Field(max_length=4096)
    path: RelPath
    sha256: Sha256 | None = None
    max_mb: StrictInt | None = Field(default=None, ge=1)
    cache: StrictBool = False

    @model_validator(mode="after")
    def _scheme(self) -> InputUrl:
        if not self.url.lower().startswith(("http://", "https://")):
            raise ValueError("input url must be http:// or https://")
        return self


class Inputs(_Wire):
    urls: list[InputUrl] = Field(default_factory=list, max_length=MAX_ITEMS)
    inline: dict[RelPath, StrictStr] = Field(default_factory=dict, max_length=MAX_ITEMS)

    @model_validator(mode="after")
    def _unique(self) -> Inputs:
        paths = [u.path for u in self.urls] + list(self.inline)
        if len(paths) != len(set(paths)):
            raise ValueError("input paths must be unique")
        if (
            sum(len(v.encode("utf-8", "surrogatepass")) for v in self.inline.values())
            > MAX_INLINE_BYTES
        ):
            raise ValueError("inline inputs exceed 4 MiB")
        return self


class ArtifactSpec(_Wire):
    path: RelPath
    type: StrictStr = Field(default="application/octet-stream", max_length=255)
    max_mb: StrictInt | None = Field(default=None, ge=1)


class Manifest(_Wire):
    job_id: Annotated[StrictStr, Field(pattern=JOB_ID_RE.pattern)]
    attempt: StrictInt = Field(default=1, ge=1)
    runner: Literal["cli", "python"]
    requirements: Requirements = Field(default_factory=Requirements)
    timeout_s: StrictInt = Field(ge=1, le=30 * 24 * 3600)
    input: Inputs | None = None
    command: StrictStr | None = Field(default=None, max_length=255)
    args: list[StrictStr] = Field(default_factory=list, max_length=4096)
    task: StrictStr | None = None
    params: dict[StrictStr, Any] | None = None
    env: dict[StrictStr, StrictStr] = Field(default_factory=dict, max_length=MAX_ITEMS)
    artifacts: list[ArtifactSpec] = Field(default_factory=list, max_length=MAX_ITEMS)

    @model_validator(mode="after")
    def _runner_fields(self) -> Manifest:
        if self.runner == "cli" and not self.command:
            raise ValueError("runner 'cli' needs 'command'")
        if self.runner == "python":
            if not self.task:
                raise ValueError("runner 'python' needs 'task'")
            if not TASK_RE.fullmatch(self.task):
                raise ValueError("task must be a dotted Python module name")
        paths = [a.path for a in self.artifacts]
        if len(paths) != len(set(paths)):
            raise ValueError("artifact paths must be unique")
        return self

    @property
    def inputs(self) -> Inputs:
        return self.input or Inputs()

    @property
    def task_params(self) -> dict[str, Any]:
        return dict(self.params or {})


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """A short, single-line reason naming the offending fields."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"]) or "manifest"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"(+{more} more)")
    return "; ".join(parts)


def parse_manifest(raw: object) -> Manifest:
    """Validate a manifest; raises JobFailure(E_INVALID) with a readable reason."""
    if not isinstance(raw, dict):
        raise JobFailure(ErrorCode.INVALID, "manifest must be a JSON object")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise JobFailure(ErrorCode.INVALID, describe_validation_error(exc)) from None


def job_identity(raw: object) -> tuple[str, int] | None:
    """(job_id, attempt) if the raw job names itself well enough to be reported."""
    if not isinstance(raw, dict):
        return None
    job_id = raw.get("job_id")
    attempt = raw.get("attempt", 1)
    if not isinstance(job_id, str) or not 0 < len(job_id) <= 512:
        return None
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        attempt = 1
    return job_id, attempt


# --- coordinator replies (lenient types, validated shape) --------------------------


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RegisterReply(_Reply):
    node_token: str = Field(min_length=1, max_length=8192)
    expires_at: str | None = None
    status: Literal["active", "pending"] = "active"
    heartbeat_interval_s: float | None = Field(default=None, gt=0, le=3600)


class HeartbeatReply(_Reply):
    status: Literal["active", "pending", "disabled"] = "active"
    cancel: list[str] = Field(default_factory=list, max_length=10_000)


class Lease(_Reply):
    lease_id: str = Field(min_length=1, max_length=1024)
    expires_at: str | None = None


class Signature(_Reply):
    key_id: str = Field(max_length=256)
    alg: str = Field(max_length=64)
    value: str = Field(max_length=4096)


class PullReply(_Reply):
    job: dict[str, Any] | None = None
    lease: Lease | None = None
    signature: Signature | None = None


class ProgressReply(_Reply):
    cancel: bool = False


class UploadStarted(_Reply):
    upload_id: str = Field(min_length=1, max_length=1024)
    chunk_size: int = Field(gt=0, le=1 << 31)
    received: int = Field(ge=0)


class UploadStatus(_Reply):
    received: int = Field(ge=0)
    size: int | None = None
    complete: bool = False
