"""run_process with real (short) processes: exit, logs, progress, limits, killing groups."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import trio

from aitbc_miner.runners.base import Ending, ProcessResult, Spawn, run_process
from tests.support.wait import wait_for

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


def spawn(tmp_path: Path, script: str, **kw: object) -> Spawn:
    params: dict[str, object] = {
        "argv": ["/bin/sh", "-c", script],
        "cwd": tmp_path,
        "env": ENV,
        "log_path": tmp_path / "exec.log",
        "timeout_s": 20.0,
        "kill_grace_s": 5.0,
    }
    params.update(kw)
    return Spawn(**params)  # type: ignore[arg-type]


async def run(s: Spawn, cancel: trio.Event | None = None, **kw: object) -> ProcessResult:
    return await run_process(s, cancel=trio.Event() if cancel is None else cancel, **kw)  # type: ignore[arg-type]


def gone(pid: int) -> bool:
    """Absent or a zombie: either way it runs no more."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def pid_file(tmp_path: Path) -> Iterator[Path]:
    """Where a job records a background child's pid; the child is killed if a test fails."""
    path = tmp_path / "child.pid"
    yield path
    if path.exists():
        pid = int(path.read_text())
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def log(tmp_path: Path) -> bytes:
    return (tmp_path / "exec.log").read_bytes()


async def test_exit_code_and_output_captured(tmp_path: Path) -> None:
    r = await run(spawn(tmp_path, "echo to-stdout; echo to-stderr >&2; exit 3"))
    assert r.ending is Ending.EXITED
    assert r.exit_code == 3 and r.signal is None
    assert log(tmp_path) == b"to-stdout\nto-stderr\n"
    assert r.log_bytes == len(log(tmp_path)) and r.log_dropped == 0
    assert r.wall_s < 10


async def test_exit_zero(tmp_path: Path) -> None:
    r = await run(spawn(tmp_path, "true"))
    assert (r.ending, r.exit_code, r.signal) == (Ending.EXITED, 0, None)


async def test_killed_by_signal_has_no_exit_code(tmp_path: Path) -> None:
    r = await run(spawn(tmp_path, "kill -KILL $$"))
    assert r.ending is Ending.EXITED
    assert r.exit_code is None and r.signal == signal.SIGKILL


async def test_runs_in_cwd_in_its_own_session(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []

    async def on_started(pgid: int) -> None:
        seen.append((os.getpgid(pgid), os.getsid(pgid)))

    r = await run(spawn(tmp_path, "pwd"), on_started=on_started)
    assert r.exit_code == 0
    assert log(tmp_path).decode().strip() == str(tmp_path)
    [(pgid, sid)] = seen
    assert pgid != os.getpgrp()
    assert sid == pgid  # a session leader: own session, own group


async def test_missing_program_raises(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        await run(spawn(tmp_path, "", argv=[str(tmp_path / "no-such-program")]))
    assert len(os.listdir("/proc/self/fd")) == before


async def test_progress_lines_parsed(tmp_path: Path) -> None:
    calls: list[tuple[int, str]] = []
    script = (
        "echo 'AITBC_PROGRESS 42 note'; "
        "echo 'AITBC_PROGRESS 420'; "
        "echo 'not AITBC_PROGRESS 5'; "
        "echo 'AITBC_PROGRESS x'; "
        "echo 'AITBC_PROGRESS 7   spaced note  '; "
        "printf 'AITBC_PROG'; sleep 0.05; printf 'RESS 99 split\\n'; "
        "printf 'AITBC_PROGRESS 100 unterminated'"
    )
    r = await run(spawn(tmp_path, script), on_progress=lambda pct, note: calls.append((pct, note)))
    assert r.exit_code == 0
    assert calls == [(42, "note"), (100, ""), (7, "spaced note"), (99, "split")]
    assert b"AITBC_PROGRESS 42 note" in log(tmp_path)  # progress lines are logged too


async def test_log_cap_enforced(tmp_path: Path) -> None:
    s = spawn(tmp_path, "head -c 1000000 /dev/zero; echo done", log_cap_bytes=1000)
    r = await run(s)
    assert r.exit_code == 0
    assert r.log_bytes == 1000
    assert r.log_dropped == 1000000 + len("done\n") - 1000
    data = log(tmp_path)
    assert len(data) < 1200
    assert data[:1000] == b"\0" * 1000
    assert f"[aitbc-miner: {r.log_dropped} bytes of output dropped]".encode() in data[1000:]


async def test_log_file_mode_0600(tmp_path: Path) -> None:
    await run(spawn(tmp_path, "echo x"))
    assert stat.S_IMODE((tmp_path / "exec.log").stat().st_mode) == 0o600


async def test_timeout_kills_the_whole_group(tmp_path: Path, pid_file: Path) -> None:
    s = spawn(tmp_path, f"sleep 30 & echo $! > {pid_file}; wait", timeout_s=0.5)
    r = await run(s)
    assert r.ending is Ending.TIMEOUT
    assert r.exit_code is None and r.signal == signal.SIGTERM
    assert 0.5 <= r.wall_s < 5
    grandchild = int(pid_file.read_text())
    wait_for(lambda: gone(grandchild), timeout=5, what="background grandchild to die")


async def test_cancel_event_stops_the_job(tmp_path: Path, pid_file: Path) -> None:
    cancel = trio.Event()

    def on_progress(pct: int, note: str) -> None:
        cancel.set()  # the job told us it is running: cancel it now

    s = spawn(tmp_path, f"sleep 30 & echo $! > {pid_file}; echo 'AITBC_PROGRESS 1 up'; wait")
    r = await run(s, cancel=cancel, on_progress=on_progress)
    assert r.ending is Ending.CANCELLED
    assert r.exit_code is None and r.signal == signal.SIGTERM
    assert r.wall_s < 5
    grandchild = int(pid_file.read_text())
    wait_for(lambda: gone(grandchild), timeout=5, what="background grandchild to die")


async def test_sigterm_ignored_then_sigkilled_after_grace(tmp_path: Path) -> None:
    cancel = trio.Event()
    s = spawn(tmp_path, "trap '' TERM; echo 'AITBC_PROGRESS 1'; sleep 30", kill_grace_s=0.5)
    started = time.monotonic()
    r = await run(s, cancel=cancel, on_progress=lambda pct, note: cancel.set())
    assert r.ending is Ending.CANCELLED
    assert r.signal == signal.SIGKILL and r.exit_code is None
    assert 0.5 <= time.monotonic() - started < 5


async def test_stragglers_after_normal_exit_are_killed(tmp_path: Path, pid_file: Path) -> None:
    # The background child keeps stdout open: run_process must neither wait for it
    # nor leave it running.
    s = spawn(tmp_path, f"sleep 30 & echo $! > {pid_file}; echo leader-done; exit 0")
    r = await run(s)
    assert r.ending is Ending.EXITED and r.exit_code == 0
    assert r.wall_s < 5
    assert b"leader-done" in log(tmp_path)
    grandchild = int(pid_file.read_text())
    wait_for(lambda: gone(grandchild), timeout=5, what="straggler to die")


async def test_environment_is_exactly_what_was_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AITBC_DAEMON_SECRET", "must-not-leak")
    env = {"PATH": "/usr/bin:/bin", "AITBC_JOB_ID": "j-1", "WEIRD": "a b=c", "EMPTY": ""}
    r = await run(spawn(tmp_path, "", argv=["/usr/bin/env"], env=env))
    assert r.exit_code == 0
    lines = log(tmp_path).decode().splitlines()
    assert sorted(lines) == sorted(f"{k}={v}" for k, v in env.items())


async def test_umask_077(tmp_path: Path) -> None:
    r = await run(spawn(tmp_path, "echo x > made.txt; mkdir made.d"))
    assert r.exit_code == 0
    assert stat.S_IMODE((tmp_path / "made.txt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "made.d").stat().st_mode) == 0o700


async def test_stdin_is_empty(tmp_path: Path) -> None:
    r = await run(spawn(tmp_path, "cat; echo eof"))
    assert r.exit_code == 0 and log(tmp_path) == b"eof\n"
