"""Config problems: :class:`ConfigError` and pydantic errors rewritten as ``section.key: reason``.

For: the one error type the loader raises, the :class:`FieldProblem` a model-level check
raises to blame one field, and the translation of a pydantic ``ValidationError`` into
``(where, reason)`` pairs in the wording of CONFIG.md.
Pure: no I/O. Must not: echo an input value (``include_input=False``), which may be a secret.
"""

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError


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


def _dotted(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


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
