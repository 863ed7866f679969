"""Config loader: YAML file + ``AITBC_MINER_*`` environment → one validated :class:`MinerConfig`.

For: :func:`load_config` (the passes over raw data: default token reference, ``env:NAME``
substitution, relative paths against the config file's directory, merge, validation,
node id) and :func:`redacted_dump`. Every problem is collected as ``section.key: reason``.
I/O: reads the config file and, through node_id, the machine id (or persists a node id).
Must not: echo a value that came from the environment in a problem.
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from .env import _env_overrides, _substitute
from .models import MinerConfig
from .node_id import _default_node_id
from .problems import ConfigError, _under, _validation_problems
from .values import _BOOL_WORDS
from .yaml_file import read_yaml_file

DEFAULT_AUTH_TOKEN = "env:MINER_AUTH"  # noqa: S105 - a reference, not a secret

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


def _without_overridden(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` less the values `over` replaces (so a replaced `env:NAME` is never resolved)."""
    out = {}
    for key, value in base.items():
        if key not in over:
            out[key] = value
        elif isinstance(value, dict) and isinstance(over[key], dict):
            out[key] = _without_overridden(value, over[key])
    return out


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
    raw = _substitute(_without_overridden(raw, overrides), environ, (), problems, failed, from_env)
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
