"""Durable per-job state: round trips, atomic writes, and corrupt files."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from aitbc_miner.journal import (
    STATE_FILE,
    STATE_VERSION,
    ArtifactRecord,
    JobState,
    load_state,
    save_state,
    write_atomic,
)
from aitbc_miner.lifecycle import Phase


def full_state() -> JobState:
    return JobState(
        job_id="j-1",
        attempt=2,
        phase=Phase.UPLOADING,
        lease_id="lease-9",
        runner="python",
        gpu=True,
        created_at=1.5,
        updated_at=2.5,
        confirmed=False,
        final_key="key-1",
        error_code=None,
        error_msg=None,
        exit_code=0,
        pgid=4242,
        cgroup="/sys/fs/cgroup/aitbc/j-1",
        gpus=("GPU-a", "GPU-b"),
        started_at="2025-09-26T12:00:00Z",
        finished_at="2025-09-26T12:01:00Z",
        duration_s=60.0,
        usage={"cpu_s": 1.25, "max_rss_mb": 10, "gpu": [0]},
        artifacts=(
            ArtifactRecord("out.mp4", "video/mp4", 1234, "a" * 64, upload_id="u-1"),
            ArtifactRecord("sub/log.txt", "text/plain", 0, "b" * 64),
        ),
        phase_times={"RUNNING": 10.0, "UPLOADING": 70.0},
    )


def test_round_trip(tmp_path: Path) -> None:
    state = full_state()
    save_state(tmp_path, state)
    loaded = load_state(tmp_path)
    assert loaded == state
    assert loaded.phase is Phase.UPLOADING
    assert loaded.artifacts[0].upload_id == "u-1"
    assert isinstance(loaded.artifacts, tuple) and isinstance(loaded.gpus, tuple)


@pytest.mark.parametrize("phase", list(Phase))
def test_round_trip_every_phase(tmp_path: Path, phase: Phase) -> None:
    state = JobState(job_id="j", attempt=1, phase=phase)
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state


def test_file_content_is_versioned_json(tmp_path: Path) -> None:
    save_state(tmp_path, full_state())
    data = json.loads((tmp_path / STATE_FILE).read_text())
    assert data["version"] == STATE_VERSION
    assert data["phase"] == "UPLOADING"
    assert data["artifacts"][1]["path"] == "sub/log.txt"


def test_unknown_fields_are_ignored(tmp_path: Path) -> None:
    data = JobState(job_id="j", attempt=1, phase=Phase.DONE).to_json()
    data["from_the_future"] = 1
    (tmp_path / STATE_FILE).write_text(json.dumps(data))
    assert load_state(tmp_path).phase is Phase.DONE


def test_evolve_returns_a_new_state() -> None:
    s = JobState(job_id="j", attempt=1, phase=Phase.ACKED)
    t = s.evolve(phase=Phase.PREP, lease_id="l")
    assert s.phase is Phase.ACKED and s.lease_id is None
    assert t.phase is Phase.PREP and t.lease_id == "l" and t.job_id == "j"


def test_save_replaces_previous_state(tmp_path: Path) -> None:
    save_state(tmp_path, JobState(job_id="j", attempt=1, phase=Phase.RUNNING))
    save_state(tmp_path, JobState(job_id="j", attempt=1, phase=Phase.DONE, confirmed=True))
    loaded = load_state(tmp_path)
    assert loaded.phase is Phase.DONE and loaded.confirmed is True


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    write_atomic(target, b"old content that is longer")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_write_atomic_large_payload(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    write_atomic(tmp_path / "big", data)
    assert (tmp_path / "big").read_bytes() == data


def test_file_mode_0600(tmp_path: Path) -> None:
    save_state(tmp_path, full_state())
    assert stat.S_IMODE((tmp_path / STATE_FILE).stat().st_mode) == 0o600
    write_atomic(tmp_path / "other", b"x")
    assert stat.S_IMODE((tmp_path / "other").stat().st_mode) == 0o600


def test_write_atomic_does_not_follow_a_planted_temp_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / ".f.json.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "f.json", b"data")
    assert victim.read_bytes() == b"keep"


def _valid_json() -> dict:
    return JobState(job_id="j", attempt=1, phase=Phase.RUNNING).to_json()


def _with(**changes: object) -> bytes:
    data = _valid_json()
    data.update(changes)
    return json.dumps(data).encode()


def _without(key: str) -> bytes:
    data = _valid_json()
    del data[key]
    return json.dumps(data).encode()


CORRUPT = {
    "empty": b"",
    "not json": b"hello",
    "truncated": json.dumps(_valid_json()).encode()[:-7],
    "half written": json.dumps(_valid_json()).encode()[:20],
    "binary garbage": b"\xff\xfe\x00\x01",
    "list": b"[1, 2]",
    "string": b'"state"',
    "null": b"null",
    "number": b"3",
    "wrong version": _with(version=2),
    "version missing": _without("version"),
    "version as string": _with(version="1"),
    "phase missing": _without("phase"),
    "phase unknown": _with(phase="SLEEPING"),
    "phase wrong type": _with(phase=[1]),
    "job_id missing": _without("job_id"),
    "job_id int": _with(job_id=5),
    "attempt string": _with(attempt="1"),
    "artifacts not records": _with(artifacts=[1, 2]),
    "artifact missing fields": _with(artifacts=[{"path": "a"}]),
    "artifact unknown field": _with(artifacts=[{"path": "a", "type": "t", "size": 1,
                                                "sha256": "x", "evil": 1}]),
    "gpus not iterable": _with(gpus=5),
    "deeply nested": b"[" * 100_000,
}  # fmt: skip


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_corrupt_state_raises_value_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / STATE_FILE).write_bytes(content)
    with pytest.raises(ValueError):
        load_state(tmp_path)


def test_missing_state_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path)
