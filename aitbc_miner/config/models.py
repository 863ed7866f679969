"""Config section models: the frozen pydantic tree whose keys and meanings CONFIG.md defines.

For: :class:`MinerConfig` and one model per section, with their defaults, bounds and
cross-field checks (which raise :class:`FieldProblem` to blame one key).
Pure: no I/O; loading and merging sources is the loader's job.
Must not: echo a secret (``coordinator.auth_token``, ``security.hmac_keys`` values) in a repr.
"""

import base64
import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from .problems import FieldProblem
from .values import (
    AbsPath,
    Duration,
    Ed25519KeyB64,
    NodeId,
    NonEmptyStr,
    Secret,
    Sha256Hex,
    TlsVerify,
    _check_listen,
    _lower,
    _yaml_off,
    split_host_port,
)

ENV_PREFIX = "AITBC_MINER_"
ENV_DELIMITER = "__"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _empty_section(cls, data: Any) -> Any:
        return {} if data is None else data  # `section:` with every child commented out


class CoordinatorConfig(_Section):
    # allow_insecure_http comes first so base_url's validator can see it (info.data) and
    # report a refused http:// URL even when some other coordinator field is invalid too.
    allow_insecure_http: bool = False
    base_url: str = "https://coordinator.local/api/v1"
    auth_token: Secret
    tls_verify: TlsVerify = True
    timeout_s: Duration = Field(20.0, gt=0)
    pull_wait_s: Duration = Field(20.0, ge=0, le=300)
    progress_min_interval_s: Duration = Field(5.0, ge=0)
    max_response_bytes: int = Field(1_048_576, gt=0)

    @field_validator("base_url")
    @classmethod
    def _url_shape(cls, value: str, info: ValidationInfo) -> str:
        if any(ord(c) <= 32 or ord(c) == 127 for c in value):
            raise ValueError("must not contain whitespace or control characters")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        try:
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            raise ValueError("has an invalid port") from None
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not embed credentials (use coordinator.auth_token)")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        insecure_ok = info.data.get("allow_insecure_http", False)
        if parts.scheme == "http" and not insecure_ok and not _is_loopback(parts.hostname):
            raise ValueError(
                "plain http:// is only allowed for loopback hosts "
                "(set coordinator.allow_insecure_http to override)"
            )
        return value.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BackoffConfig(_Section):
    min_s: Duration = Field(5.0, gt=0)
    max_s: Duration = Field(120.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "BackoffConfig":
        if self.min_s > self.max_s:
            raise FieldProblem("min_s", f"must be <= max_s ({self.max_s:g})")
        return self


class HeartbeatConfig(_Section):
    interval_s: Duration = Field(15.0, gt=0)
    jitter_pct: float = Field(10.0, ge=0, le=50)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)


class CliRunnerConfig(_Section):
    enable: bool = True
    allowlist_files: tuple[NonEmptyStr, ...] = ("/etc/aitbc/miner/allowlist.d/*.yaml",)
    max_args: int = Field(256, ge=1, le=65536)


class PythonRunnerConfig(_Section):
    enable: bool = True
    task_paths: tuple[AbsPath, ...] = (Path("/usr/local/lib/aitbc/miner/tasks"),)
    venv: AbsPath = Path("/usr/local/lib/aitbc/miner/.venv")
    network: bool = False  # whether python tasks may reach the network


class RunnersConfig(_Section):
    cli: CliRunnerConfig = Field(default_factory=CliRunnerConfig)
    python: PythonRunnerConfig = Field(default_factory=PythonRunnerConfig)


class ResourcesConfig(_Section):
    max_concurrent_cpu: int = Field(2, ge=0)
    max_concurrent_gpu: int = Field(1, ge=0)
    cpu_nice: int = Field(10, ge=0, le=19)
    io_class: Literal["best-effort", "idle"] = "best-effort"
    io_level: int = Field(6, ge=0, le=7)
    mem_soft_mb: int = Field(16384, gt=0)
    cgroup: Annotated[Literal["auto", "off", "required"], BeforeValidator(_yaml_off)] = "auto"
    max_open_files: int = Field(4096, ge=16)  # RLIMIT_NOFILE per job process
    max_processes: int = Field(4096, ge=1)  # RLIMIT_NPROC (per uid, as the kernel counts it)
    max_pids: int = Field(512, ge=1)  # pids.max of a job's cgroup
    landlock: bool = True  # confine each job's filesystem view where the kernel has Landlock
    warm_starts: bool = True  # prepare job starts ahead (cgroups joined, netns entered)

    @model_validator(mode="after")
    def _some_slot(self) -> "ResourcesConfig":
        if self.max_concurrent_cpu == 0 and self.max_concurrent_gpu == 0:
            raise FieldProblem(
                "max_concurrent_cpu", "max_concurrent_cpu and max_concurrent_gpu cannot both be 0"
            )
        return self


class GpuConfig(_Section):
    enable: bool = True
    policy: Literal["least-used-vram"] = "least-used-vram"
    jobs_per_gpu: int = Field(1, ge=1)
    sweep_grace_s: Duration = Field(5.0, ge=0)  # leftover GPU memory after a job: then quarantine


class WorkspaceConfig(_Section):
    root: AbsPath = Path("/var/lib/aitbc/miner/jobs")
    keep_success: Duration = Field(86400.0, ge=0)
    keep_failed: Duration = Field(604800.0, ge=0)
    exec_log_max_mb: int = Field(16, gt=0)
    min_free_mb: int = Field(1024, ge=0)
    sweep_interval_s: Duration = Field(600.0, gt=0)


class UploadConfig(_Section):
    chunk_threshold_mb: int = Field(8, gt=0)


class CacheConfig(_Section):
    root: AbsPath = Path("/var/cache/aitbc/miner")
    max_gb: float = Field(100.0, gt=0)
    pinned: tuple[Sha256Hex, ...] = ()


class SecurityConfig(_Section):
    require_signed_manifests: bool = True
    manifest_keys: dict[NonEmptyStr, Ed25519KeyB64] = Field(default_factory=dict)
    hmac_keys: dict[NonEmptyStr, Secret] = Field(default_factory=dict)
    allow_private_inputs: bool = False

    def manifest_key_bytes(self) -> dict[str, bytes]:
        """key_id → raw 32-byte ed25519 public key (already validated at load)."""
        return {key_id: base64.b64decode(b64) for key_id, b64 in self.manifest_keys.items()}


class HealthConfig(_Section):
    listen: Annotated[str, AfterValidator(_check_listen)] = "127.0.0.1:9464"
    enable_metrics: bool = True

    def address(self) -> tuple[str, int] | None:
        """(host, port) to bind, or None when the endpoint is disabled."""
        return split_host_port(self.listen) if self.listen else None


class ShutdownConfig(_Section):
    grace_s: Duration = Field(300.0, ge=0)
    kill_grace_s: Duration = Field(10.0, ge=0)


class LoggingConfig(_Section):
    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    # The YAML key is `json`. A field cannot be named so (BaseModel.json exists), hence
    # the `json_` field plus a `json` property that replaces the deprecated method.
    json_: bool = Field(True, validation_alias="json", serialization_alias="json")
    path: str = "/var/log/aitbc/miner/miner.jsonl"

    @property
    def json(self) -> bool:  # type: ignore[override]
        return self.json_


class MinerConfig(BaseSettings):
    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
    )

    node_id: NodeId
    coordinator: CoordinatorConfig
    heartbeat: HeartbeatConfig = Field(default_factory=HeartbeatConfig)
    runners: RunnersConfig = Field(default_factory=RunnersConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    workspace: WorkspaceConfig = Field(default_factory=WorkspaceConfig)
    upload: UploadConfig = Field(default_factory=UploadConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):  # type: ignore[override]
        # load_config merges YAML and the (injected) environment itself, so that
        # precedence, path resolution and error messages are explicit; only init data here.
        return (init_settings,)
