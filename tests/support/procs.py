"""Process helpers shared by the test harnesses."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import Callable, Iterator


def stop_process(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, wait up to `timeout`; SIGKILL if it does not exit. Returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def kill_process(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def fake_job_processes() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Yields start(job_id, attempt=1): a `sleep 60` whose environment names the job as
    a real job's does (AITBC_JOB_ID, AITBC_ATTEMPT). Every one is killed on exit."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(job_id: str, attempt: int = 1) -> subprocess.Popen[bytes]:
        env = {"PATH": "/usr/bin:/bin", "AITBC_JOB_ID": job_id, "AITBC_ATTEMPT": str(attempt)}
        proc = subprocess.Popen(["sleep", "60"], env=env, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            kill_process(proc)
            proc.wait()
