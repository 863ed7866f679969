"""CLI allowlist: load ``allowlist.d/*.yaml`` and decide whether a CLI job may run.

For: turning the operator's allowlist files (CONFIG.md "Allowlist entries") into an
immutable :class:`Allowlist`, whose :meth:`Allowlist.check` is a pure decision over a
manifest's ``command``, ``args`` and ``env``: it returns the entry (the program is then
executed by its absolute ``path`` only) or raises :class:`Denied` (``E_DENY``).
Must not: execute anything, touch the network, import trio, read files after load,
modify its inputs, or raise anything but Denied from ``check``. Arguments are data,
never shell text: there is no shell anywhere in this path.
"""

import glob
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from aitbc_miner.config import ConfigError, read_yaml_file

__all__ = [
    "Allowlist",
    "AllowlistEntry",
    "AllowlistError",
    "Denied",
    "OptionSpec",
    "load_allowlist",
]

MAX_ARG_CHARS = 4096  # each argument is capped before any regex sees it
_SHOWN_CHARS = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
# Set by the miner itself, or read by the dynamic loader / interpreters / shells before
# the program runs: a manifest may never set these, whatever an entry's `env` says.
_RESERVED_ENV = frozenset(
    {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "BASH_ENV",
        "ENV",
        "IFS",
        "GCONV_PATH",
        "GLIBC_TUNABLES",
        "LOCPATH",
        "NLSPATH",
        "HOSTALIASES",
    }
)
_RESERVED_ENV_PREFIXES = ("LC_", "LD_", "PYTHON", "AITBC_")
_ENTRY_KEYS = frozenset(
    {
        "name",
        "command",
        "args",
        "env",
        "network",
        "max_total_args_len",
        "max_runtime_s",
        "max_output_mb",
    }
)
_DEFAULT_LIMITS = {"max_total_args_len": 4096, "max_runtime_s": 3600, "max_output_mb": 1024}
Patterns = tuple[re.Pattern[str], ...]
Report = Callable[[str, str], None]  # (field, reason) for one problem in the file at hand


class AllowlistError(Exception):
    """The allowlist files are unusable; ``problems`` holds one ``FILE: field: reason`` each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Denied(Exception):
    """A CLI job is refused (E_DENY); ``reason`` is safe to send to the coordinator."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class OptionSpec:
    flag: str  # matched literally
    value_patterns: tuple[re.Pattern[str], ...]  # one per following argv element, full match


@dataclass(frozen=True)
class AllowlistEntry:
    name: str
    path: str
    options: tuple[OptionSpec, ...]
    positionals: tuple[re.Pattern[str], ...]
    env: tuple[re.Pattern[str], ...]
    network: bool
    max_total_args_len: int
    max_runtime_s: int
    max_output_mb: int
    source: str
    available: bool  # path exists and is executable (checked at load)
    flags: Mapping[str, tuple[OptionSpec, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_flag: dict[str, list[OptionSpec]] = {}
        for spec in self.options:
            by_flag.setdefault(spec.flag, []).append(spec)
        flags = MappingProxyType({flag: tuple(specs) for flag, specs in by_flag.items()})
        object.__setattr__(self, "flags", flags)


def _show(value: object) -> str:
    """An untrusted value as it may be echoed in a denial: repr, at most 64 chars of it."""
    if isinstance(value, str):
        return repr(value[:_SHOWN_CHARS]) + ("..." if len(value) > _SHOWN_CHARS else "")
    return type(value).__name__


@dataclass(frozen=True)
class Allowlist:
    entries: Mapping[str, AllowlistEntry]
    warnings: tuple[str, ...] = ()

    def check(
        self, command: str, args: Sequence[str], env: Mapping[str, str], *, max_args: int = 256
    ) -> AllowlistEntry:
        """The entry allowing ``command args`` with ``env``; Denied with the first reason not."""
        entry = self.entries.get(command) if isinstance(command, str) else None
        if entry is None:
            raise Denied(f"command {_show(command)} is not allowlisted on this node")
        if not entry.available:
            raise Denied(f"tool {entry.name!r} is not installed on this node")
        _check_args(entry, args, max_args)
        _check_env(entry, env)
        return entry


def _check_args(entry: AllowlistEntry, args: Sequence[str], max_args: int) -> None:
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise Denied("args must be a list of strings")
    if len(args) > max_args:
        raise Denied(f"too many arguments ({len(args)} > {max_args})")
    total = 0
    for index, arg in enumerate(args):
        if not isinstance(arg, str):
            raise Denied(f"argument {index} is not a string ({_show(arg)})")
        if "\x00" in arg:
            raise Denied(f"argument {index} contains a NUL byte")
        if len(arg) > MAX_ARG_CHARS:
            raise Denied(f"argument {index} is longer than {MAX_ARG_CHARS} characters")
        total += len(arg)
    if total > entry.max_total_args_len:
        raise Denied(
            f"arguments are {total} characters in total; "
            f"{entry.name} allows {entry.max_total_args_len}"
        )
    index = 0
    while index < len(args):
        arg = args[index]
        specs = entry.flags.get(arg)
        if specs:  # an exact flag match wins over positional patterns
            index = _consume_option(entry, specs, args, index)
        elif any(pattern.fullmatch(arg) for pattern in entry.positionals):
            index += 1
        else:
            raise Denied(f"argument {index} {_show(arg)} is not allowed for {entry.name}")


def _consume_option(
    entry: AllowlistEntry, specs: tuple[OptionSpec, ...], args: Sequence[str], index: int
) -> int:
    """Index after the option at ``index`` and its values; Denied when no spec fits."""
    failure: tuple[int, str] | None = None
    for spec in specs:
        wanted = len(spec.value_patterns)
        values = args[index + 1 : index + 1 + wanted]
        bad = next(
            (
                i
                for i, (pattern, value) in enumerate(zip(spec.value_patterns, values, strict=False))
                if not pattern.fullmatch(value)
            ),
            None,
        )
        if bad is None and len(values) == wanted:
            return index + 1 + wanted
        if bad is None:
            reason = (
                f"option {_show(args[index])} (argument {index}) needs {wanted} "
                f"value{'s' if wanted != 1 else ''}"
            )
            at = index + 1 + len(values)
        else:
            at = index + 1 + bad
            reason = (
                f"argument {at} {_show(args[at])} is not an allowed value for option "
                f"{_show(args[index])} of {entry.name}"
            )
        if failure is None or at > failure[0]:  # report the spec that got farthest
            failure = (at, reason)
    assert failure is not None
    raise Denied(failure[1])


def _is_reserved(key: str) -> bool:
    upper = key.upper()  # be conservative: `ld_preload` is refused too
    return upper in _RESERVED_ENV or upper.startswith(_RESERVED_ENV_PREFIXES)


def _check_env(entry: AllowlistEntry, env: Mapping[str, str]) -> None:
    if not isinstance(env, Mapping):
        raise Denied("env must be a mapping of strings")
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME_RE.fullmatch(key):
            raise Denied(f"environment variable name {_show(key)} is not valid")
        if _is_reserved(key):
            raise Denied(f"environment variable {key!r} is reserved")
        if not any(pattern.fullmatch(key) for pattern in entry.env):
            raise Denied(f"environment variable {key!r} is not allowed for {entry.name}")
        if not isinstance(value, str):
            raise Denied(f"environment variable {key!r} must be a string")
        if "\x00" in value:
            raise Denied(f"environment variable {key!r} contains a NUL byte")


# --- loading -------------------------------------------------------------------------


def load_allowlist(patterns: Sequence[str]) -> Allowlist:
    """Load every file the globs name (each glob's matches sorted); AllowlistError lists all."""
    problems: list[str] = []
    warnings: list[str] = []
    files: list[str] = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern))
        if not matched:
            if any(c in pattern for c in "*?["):
                warnings.append(f"{pattern}: matched no allowlist files")
            else:
                problems.append(f"{pattern}: file not found")
        files.extend(f for f in matched if f not in files)
    entries: dict[str, AllowlistEntry] = {}
    for source in files:
        entry = _load_file(source, problems, warnings)
        if entry is None:
            continue
        if entry.name in entries:
            problems.append(
                f"{source}: name: duplicate tool name {entry.name!r} "
                f"(also defined in {entries[entry.name].source})"
            )
            continue
        entries[entry.name] = entry
    if problems:
        raise AllowlistError(problems)
    if not entries:
        warnings.append("no allowlist entries loaded: every CLI job will be denied")
    return Allowlist(entries=MappingProxyType(entries), warnings=tuple(warnings))


def _load_file(source: str, problems: list[str], warnings: list[str]) -> AllowlistEntry | None:
    try:
        data = read_yaml_file(source)
    except ConfigError as exc:
        problems.extend(exc.problems)  # already "FILE: reason"
        return None
    if not isinstance(data, dict):
        problems.append(f"{source}: top level must be a mapping (one entry per file)")
        return None
    before = len(problems)
    entry = _parse_entry(source, data, problems.append)
    if len(problems) > before or entry is None:
        return None
    if not entry.available:
        warnings.append(
            f"{source}: command.path: {entry.path} does not exist or is not "
            f"executable; {entry.name!r} jobs will be denied"
        )
    return entry


def _parse_entry(
    source: str, data: dict[Any, Any], problem: Callable[[str], None]
) -> AllowlistEntry | None:
    def bad(where: str, reason: str) -> None:
        problem(f"{source}: {where}: {reason}")

    for key in data:
        if key not in _ENTRY_KEYS:
            bad(str(key), "unknown key")
    path = _command_path(data.get("command"), bad)
    name = data.get("name", os.path.basename(path or ""))
    if (path or "name" in data) and (not isinstance(name, str) or not _NAME_RE.fullmatch(name)):
        bad("name", f"{_show(name)} must match ^{_NAME_RE.pattern}$ (set name: explicitly)")
    options, positionals = _parse_args(data.get("args", []), bad)
    env = _parse_env(data.get("env", []), bad)
    network = data.get("network", False)
    if not isinstance(network, bool):
        bad("network", "must be true or false")
    limits = {}
    for key, default in _DEFAULT_LIMITS.items():
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            bad(key, "must be a positive integer")
        limits[key] = value
    if path is None or not isinstance(name, str):
        return None
    return AllowlistEntry(
        name=name,
        path=path,
        options=options,
        positionals=positionals,
        env=env,
        network=bool(network),
        source=source,
        available=os.path.isfile(path) and os.access(path, os.X_OK),
        **limits,
    )


def _command_path(command: Any, bad: Report) -> str | None:
    if not isinstance(command, dict) or "path" not in command:
        bad("command", "must be a mapping with an absolute path:")
        return None
    for key in command:
        if key != "path":
            bad(f"command.{key}", "unknown key")
    path = command["path"]
    if not isinstance(path, str) or not os.path.isabs(path) or "\x00" in path:
        bad("command.path", "must be an absolute path")
        return None
    return path


def _compile(pattern: Any, where: str, bad: Report) -> re.Pattern[str] | None:
    if not isinstance(pattern, str):
        bad(where, "must be a string (a regular expression)")
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        bad(where, f"invalid regex {pattern!r}: {exc}")
        return None


def _parse_args(items: Any, bad: Report) -> tuple[tuple[OptionSpec, ...], Patterns]:
    options: list[OptionSpec] = []
    positionals: list[re.Pattern[str]] = []
    if not isinstance(items, list):
        bad("args", "must be a list of items (each a list)")
        return (), ()
    for i, item in enumerate(items):
        where = f"args[{i}]"
        if not isinstance(item, list) or not item or not all(isinstance(x, str) for x in item):
            bad(where, "must be a non-empty list of strings")
            continue
        if item[0].startswith("-"):
            patterns = [_compile(p, f"{where}[{j}]", bad) for j, p in enumerate(item[1:], 1)]
            if all(p is not None for p in patterns):
                options.append(OptionSpec(item[0], tuple(p for p in patterns if p)))
        elif len(item) != 1:
            bad(where, "a positional item has exactly one pattern (options start with '-')")
        elif (pattern := _compile(item[0], f"{where}[0]", bad)) is not None:
            positionals.append(pattern)
    return tuple(options), tuple(positionals)


def _parse_env(items: Any, bad: Report) -> Patterns:
    if not isinstance(items, list):
        bad("env", "must be a list of names or regular expressions")
        return ()
    compiled = [_compile(p, f"env[{i}]", bad) for i, p in enumerate(items)]
    return tuple(p for p in compiled if p is not None)
