"""Per-job durable state: `<workspace>/<job_id>/state.json`, written atomically.

I/O: filesystem only. The state file is written *before* the work of the
phase it names starts (STYLE rule 6): temp file, fsync, rename, fsync dir.
Recovery reads only state.json; it never guesses from other files. Secrets
(tokens, keys) are never part of the state.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .lifecycle import Phase

STATE_FILE = "state.json"
STATE_VERSION = 1


@dataclass(frozen=True)
class ArtifactRecord:
    path: str
    type: str
    size: int
    sha256: str
    upload_id: str | None = None


@dataclass(frozen=True)
class JobState:
    job_id: str
    attempt: int
    phase: Phase
    lease_id: str | None = None
    runner: str = "cli"
    gpu: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    confirmed: bool = False  # the coordinator accepted the final report
    final_key: str | None = None  # Idempotency-Key of the final result/fail call
    error_code: str | None = None
    error_msg: str | None = None
    retryable: bool | None = None
    exit_code: int | None = None
    pgid: int | None = None  # process group of the job (recovery kills by group)
    boot_id: str | None = None  # a pgid means nothing after a reboot
    max_output_mb: int | None = None  # output cap decided at ACKED, reused by recovery
    cgroup: str | None = None
    gpus: tuple[str, ...] = ()
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    artifacts: tuple[ArtifactRecord, ...] = ()
    phase_times: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["version"] = STATE_VERSION
        data["phase"] = self.phase.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobState:
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported state version {data.get('version')!r}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["phase"] = Phase(kwargs["phase"])
        kwargs["gpus"] = tuple(kwargs.get("gpus", ()))
        kwargs["artifacts"] = tuple(ArtifactRecord(**a) for a in kwargs.get("artifacts", ()))
        state = cls(**kwargs)
        if not isinstance(state.job_id, str) or not isinstance(state.attempt, int):
            raise ValueError("job_id/attempt have wrong types")
        return state

    def evolve(self, **changes: Any) -> JobState:
        return replace(self, **changes)


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` so a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_state(job_dir: Path, state: JobState) -> None:
    payload = json.dumps(state.to_json(), sort_keys=True, separators=(",", ":")).encode()
    write_atomic(job_dir / STATE_FILE, payload)


def load_state(job_dir: Path) -> JobState:
    """Raises ValueError/OSError for a missing, corrupt or half-written file."""
    with open(job_dir / STATE_FILE, "rb") as fh:
        raw = fh.read(1 << 20)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ValueError(f"state.json is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("state.json is not an object")
    try:
        return JobState.from_json(data)
    except (TypeError, KeyError) as exc:
        raise ValueError(f"state.json has a bad shape: {exc}") from None


def current_boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return None
