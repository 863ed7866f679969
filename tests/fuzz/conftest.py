"""Fuzz suite set-up: registers the hypothesis profiles (see profile.py) and reports
how many inputs the properties were fed."""

from __future__ import annotations

from typing import Any

from tests.fuzz.profile import ACTIVE, GENERATED


def pytest_report_header(config: Any) -> str:
    return f"fuzz profile: {ACTIVE}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not GENERATED:
        return
    total = sum(GENERATED.values())
    parts = ", ".join(f"{kind} {n}" for kind, n in sorted(GENERATED.items()))
    terminalreporter.write_line(f"fuzz ({ACTIVE}): {total} generated inputs ({parts})")
