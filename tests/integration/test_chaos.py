"""The short form of `make chaos`: faults + SIGKILLs lose and duplicate nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_chaos_short_run_loses_and_duplicates_nothing():
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "chaos.py"),
            "--jobs",
            "60",
            "--kills",
            "4",
            "--terms",
            "1",
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CHAOS_RESULT ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("CHAOS_RESULT "))
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert result["jobs"] == 60 and result["kills"] == 4 and result["terms"] == 1
    for invariant in (
        "lost",
        "duplicated",
        "wrong_sha256",
        "wrong_outcome",
        "orphans",
        "non_final_workspaces",
    ):
        assert result[invariant] == 0, (invariant, result)
    assert result["faults_fired"] > 0
