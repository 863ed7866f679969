"""Python runner: a trusted task module's `run(**params)` in a child process.

Pure except for existence checks: finds the task file under the configured
task paths and builds the argv of the task host (`_taskhost.py`), which runs
under the configured venv's interpreter in isolated mode (-I), so limits,
timeouts and kills work exactly as for CLI jobs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ErrorCode, JobFailure

TASK_HOST = Path(__file__).with_name("_taskhost.py")
TASK_SPEC_FILE = "task.json"


def find_task(task: str, task_paths: Sequence[str]) -> Path:
    """The task's file (module or package) in the first task path that has it."""
    rel = Path(*task.split("."))
    for base in task_paths:
        for candidate in (Path(base) / rel.with_suffix(".py"), Path(base) / rel / "__init__.py"):
            if candidate.is_file():
                return candidate
    raise JobFailure(ErrorCode.DENY, f"task {task!r} is not installed on this node")


def interpreter(venv: str) -> str:
    return str(Path(venv) / "bin" / "python")


def write_task_spec(
    job_dir: Path, task: str, task_paths: Sequence[str], params: Mapping[str, Any], output_dir: Path
) -> Path:
    spec = {
        "task": task,
        "paths": [str(Path(p).resolve()) for p in task_paths],
        "params": dict(params),
        "output_dir": str(output_dir),
    }
    path = job_dir / TASK_SPEC_FILE
    path.write_text(json.dumps(spec))
    path.chmod(0o400)
    return path


def build_argv(venv: str, spec_path: Path) -> list[str]:
    return [interpreter(venv), "-I", "-B", str(TASK_HOST), str(spec_path)]
