"""CLI runner: an allowlisted program, executed by its absolute path, never a shell.

Pure: turns a validated manifest and its allowlist entry into an argv.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..allowlist import AllowlistEntry


def build_argv(entry: AllowlistEntry, args: Sequence[str]) -> list[str]:
    """argv[0] is the entry's absolute path; args were validated by the allowlist."""
    return [entry.path, *args]
