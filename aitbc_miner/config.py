"""Configuration: one frozen, typed tree from a YAML file plus ``AITBC_MINER_*`` environment.

For: turning ``--config PATH`` and the environment into a validated :class:`MinerConfig`
(the contract is CONFIG.md), or a :class:`ConfigError` that lists every problem as
``section.key: reason``. Each component then receives only its own branch.
Must not: touch the network, import trio, configure logging, or echo a secret
(``coordinator.auth_token``, ``security.hmac_keys`` values) in an error or a repr.
Its only file-system effects are reading the config file and ``/etc/machine-id``
and, when there is no machine id, persisting a generated node id.
"""

import base64
import binascii
import ipaddress
import json
import math
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin
from urllib.parse import urlsplit

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

__all__ = [
    "ConfigError",
    "MinerConfig",
    "load_config",
    "parse_duration",
    "read_yaml_file",
    "redacted_dump",
    "split_host_port",
]

ENV_PREFIX = "AITBC_MINER_"
ENV_DELIMITER = "__"
DEFAULT_AUTH_TOKEN = "env:MINER_AUTH"  # noqa: S105 - a reference, not a secret
NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_REF_RE = re.compile(r"env:(.*)", re.DOTALL)
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
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


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one ``section.key: reason`` each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class FieldProblem(ValueError):
    """Raised by a model-level check to blame one field of that model (see _reason)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        super().__init__(reason)


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- value types -----------------------------------------------------------------------


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


# --- the tree (keys and meanings: CONFIG.md) -----------------------------------------


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


# --- YAML ------------------------------------------------------------------------------


class _StrictYamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys: a silent override hides typos."""


def _construct_unique_mapping(
    loader: _StrictYamlLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {_short(key)}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictYamlLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def read_yaml_file(path: str | os.PathLike[str]) -> Any:
    """Parse one YAML file (duplicate keys refused); ConfigError(["PATH: reason"]) on failure."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid UTF-8"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    try:
        return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        # Only the problem text: the parser's snippet could echo a secret from the file.
        reason = exc.problem or exc.context
        raise ConfigError([f"{path}: YAML syntax error{where}: {reason}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML error ({type(exc).__name__})"]) from None


# --- environment overrides -----------------------------------------------------------


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' env source, reading an injected mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._injected = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._injected.items()}


def _field_for(model: type[BaseModel], key: str) -> FieldInfo | None:
    for name, info in model.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else name
        if key == alias:
            return info
    return None


def _setting_kind(segments: list[str]) -> str | None:
    """ "scalar" or "complex" (JSON-encoded) for an override path, None when no such key."""
    model: type[BaseModel] = MinerConfig
    for depth, segment in enumerate(segments):
        info = _field_for(model, segment)
        if info is None:
            return None
        annotation, last = info.annotation, depth == len(segments) - 1
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if last:
                return "complex"
            model = annotation
            continue
        origin = get_origin(annotation)
        if origin is dict:  # one more segment may name a key of the mapping
            if last:
                return "complex"
            return "scalar" if depth == len(segments) - 2 and segments[-1] else None
        if not last:
            return None
        return "complex" if origin in (tuple, list) else "scalar"
    return None


def _env_overrides(environ: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    selected: dict[str, str] = {}
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        segments = name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)
        kind = _setting_kind(segments)
        if kind is None:
            problems.append(f"{name}: unknown setting (no config key {'.'.join(segments)})")
            continue
        if kind == "complex":
            try:
                json.loads(value)
            except json.JSONDecodeError as exc:
                problems.append(f"{name}: invalid JSON ({exc.msg} at column {exc.colno})")
                continue
        selected[name] = value
    return dict(_MappingEnvSource(MinerConfig, selected)()) if selected else {}


# --- raw-data passes: env: references, relative paths, merge ---------------------------


def _dotted(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _substitute(
    value: Any,
    environ: Mapping[str, str],
    loc: tuple[Any, ...],
    problems: list[str],
    failed: set[str],
    secret_locs: dict[str, str] | None = None,
) -> Any:
    """Replace every ``env:NAME`` string by the variable; non-string keys are problems.

    `secret_locs` collects where a value came from the environment, so that a
    validation error there never echoes it (it may be a token put in the wrong key).
    """
    if isinstance(value, dict):
        out = {}
        for key, child in value.items():
            if not isinstance(key, str):
                problems.append(f"{_dotted((*loc, str(key)))}: keys must be strings")
                continue
            out[key] = _substitute(child, environ, (*loc, key), problems, failed, secret_locs)
        return out
    if isinstance(value, list | tuple):
        return [
            _substitute(c, environ, (*loc, i), problems, failed, secret_locs)
            for i, c in enumerate(value)
        ]
    match = _ENV_REF_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return value
    where, name = _dotted(loc), match[1]
    if not _ENV_NAME_RE.fullmatch(name):
        problems.append(f"{where}: invalid reference {_short(value)} (use env:NAME)")
    elif name not in environ:
        problems.append(f"{where}: environment variable {name} is not set")
    else:
        if secret_locs is not None:
            secret_locs[where] = name
        return environ[name]
    failed.add(where)
    return None


_PATH_KEYS = (
    ("runners", "python", "venv"),
    ("workspace", "root"),
    ("cache", "root"),
    ("logging", "path"),
    ("coordinator", "tls_verify"),
)
_PATH_LIST_KEYS = (("runners", "cli", "allowlist_files"), ("runners", "python", "task_paths"))


def _section(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any] | None:
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data if isinstance(data, dict) else None


def _resolve(value: Any, base: str) -> Any:
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.normpath(os.path.join(base, value))
    return value


def _resolve_paths(data: dict[str, Any], base: str) -> None:
    for *parents, key in _PATH_KEYS:
        section = _section(data, tuple(parents))
        if section is None or key not in section:
            continue
        value = section[key]
        if key == "tls_verify" and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            continue
        section[key] = _resolve(value, base)
    for *parents, key in _PATH_LIST_KEYS:
        section = _section(data, tuple(parents))
        if section is not None and isinstance(section.get(key), list | tuple):
            section[key] = [_resolve(item, base) for item in section[key]]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --- validation errors → "section.key: reason" ---------------------------------------

_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _reason(err: Mapping[str, Any]) -> str:
    kind, ctx, msg = err["type"], err.get("ctx") or {}, str(err["msg"])
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind in _BOUNDS:
        key, op = _BOUNDS[kind]
        bound = ctx[key]
        return f"must be {op} {int(bound) if float(bound).is_integer() else bound}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a mapping"
    if kind == "string_too_short" and ctx.get("min_length") == 1:
        return "must not be empty"
    if msg.startswith("Input should be "):
        msg = "must be " + msg[len("Input should be ") :]
    return msg.replace("a valid tuple", "a list").replace("a valid dictionary", "a mapping")


def _validation_problems(exc: ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = list(err["loc"])
        if isinstance((err.get("ctx") or {}).get("error"), FieldProblem):
            loc.append(err["ctx"]["error"].field)
        out.append((_dotted(loc), _reason(err)))
    return out


def _under(where: str, prefixes: set[str]) -> bool:
    return any(where == p or where.startswith((p + ".", p + "[")) for p in prefixes)


# --- node id -----------------------------------------------------------------------------


def _default_node_id(machine_id_path: str, workspace_root: Path) -> str:
    try:
        machine_id = Path(machine_id_path).read_text(encoding="ascii", errors="replace")
    except OSError:
        machine_id = ""
    match = re.match(r"[0-9a-f]{12}", machine_id.strip().lower())
    if match:
        return "node-" + match[0]
    return _persisted_node_id(workspace_root.parent / "node_id")


def _persisted_node_id(path: Path) -> str:
    """Read the id generated on an earlier start, or create one; never overwrite."""
    for _ in range(3):  # a concurrent first start may create the file between our steps
        try:
            existing = path.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            existing = None
        except OSError as exc:
            raise ConfigError(
                [f"node_id: cannot read {path} ({exc.strerror or exc}); set node_id"]
            ) from None
        except UnicodeDecodeError:
            existing = ""  # reported as not a valid node id below
        if existing is not None:
            if not NODE_ID_RE.fullmatch(existing):
                raise ConfigError(
                    [
                        f"node_id: {path} does not hold a valid node id; "
                        "fix or delete it, or set node_id"
                    ]
                )
            return existing
        try:
            created = _create_exclusive(path, "node-" + secrets.token_hex(6) + "\n")
        except OSError as exc:
            raise ConfigError(
                [
                    f"node_id: cannot persist a generated id at {path} "
                    f"({exc.strerror or exc}); set node_id"
                ]
            ) from None
        if created:
            return created
    raise ConfigError([f"node_id: {path} keeps changing; set node_id"])


def _create_exclusive(path: Path, text: str) -> str | None:
    """Write a complete file at path atomically; None when one is already there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".node_id.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # unlike os.replace, never clobbers a concurrent writer's id
        except FileExistsError:
            return None
    finally:
        os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return text.strip()


# --- public entry points -----------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str] | None,
    environ: Mapping[str, str] | None = None,
    *,
    machine_id_path: str = "/etc/machine-id",
) -> MinerConfig:
    """YAML file (or defaults when path is None) + AITBC_MINER_* overrides → MinerConfig.

    ``environ`` (default ``os.environ``) serves both the overrides and ``env:NAME``
    references. Raises ConfigError listing every problem.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    raw: Any = {}
    base = os.getcwd()
    if path is not None:
        raw = read_yaml_file(path)
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(
                [f"{path}: the top level must be a mapping of sections, not {type(raw).__name__}"]
            )
        base = os.path.dirname(os.path.abspath(path))
    overrides = _env_overrides(environ, problems)
    token_overridden = "auth_token" in (_section(overrides, ("coordinator",)) or {})
    if not token_overridden and isinstance(raw.get("coordinator", {}), dict | None):
        raw = {
            **raw,
            "coordinator": {"auth_token": DEFAULT_AUTH_TOKEN, **(raw.get("coordinator") or {})},
        }
    failed: set[str] = set()
    from_env: dict[str, str] = {}
    raw = _substitute(raw, environ, (), problems, failed, from_env)
    overrides = _substitute(overrides, environ, (), problems, failed, from_env)
    _resolve_paths(raw, base)
    _resolve_paths(overrides, os.getcwd())
    data = _deep_merge(raw, overrides)
    for key in [k for k in data if k not in MinerConfig.model_fields]:
        problems.append(f"{key}: unknown key")  # also keeps `_env_file` & co. out of __init__
        del data[key]
    derive_node_id = data.get("node_id") is None
    if derive_node_id:
        data["node_id"] = "node-000000000000"  # placeholder until the rest is known valid
    cfg = None
    try:
        cfg = MinerConfig(**data)
    except ValidationError as exc:
        for where, reason in _validation_problems(exc):
            if _under(where, failed):
                continue
            source = next((n for loc, n in from_env.items() if _under(where, {loc})), None)
            if source is not None:  # never echo a value read from the environment
                reason = f"invalid value from environment variable {source} (value not shown)"
            problems.append(f"{where}: {reason}")
    if problems or cfg is None:
        raise ConfigError(problems or ["configuration is invalid"])
    if derive_node_id:
        node_id = _default_node_id(machine_id_path, cfg.workspace.root)
        cfg = cfg.model_copy(update={"node_id": node_id})
    return cfg


def redacted_dump(cfg: MinerConfig) -> dict[str, Any]:
    """The effective config as plain YAML/JSON-able data, secrets shown as ``"***"``."""
    return _plain(cfg.model_dump(by_alias=True))


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
