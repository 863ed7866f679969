"""Config environment: ``AITBC_MINER_*`` overrides and ``env:NAME`` references.

For: selecting the override variables that name a config key (JSON for lists and
mappings), and replacing each ``env:NAME`` string in raw config data by the variable.
Pure: reads only the environment mapping it is given, never ``os.environ``.
Must not: echo a variable's value in a problem.
"""

import json
import re
from collections.abc import Mapping
from typing import Any, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource

from .models import ENV_DELIMITER, ENV_PREFIX, MinerConfig
from .problems import _dotted
from .values import _short

_ENV_REF_RE = re.compile(r"env:(.*)", re.DOTALL)
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
