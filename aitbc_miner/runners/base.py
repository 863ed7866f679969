"""Start a job process in its own session and supervise it to the end.

I/O: processes and pipes. The job runs in a new session (its own process
group) with a scrubbed environment and umask 077; nothing runs in the child
between fork and exec (no preexec_fn: the daemon has threads). Exit is
watched through a pidfd *without reaping*, so the group is killed while the
leader is still a zombie and its pgid cannot have been reused. stdout and
stderr go through the daemon into `logs/exec.log` (size-capped) and are
scanned for `AITBC_PROGRESS <pct> [note]` lines.
"""

from __future__ import annotations

import os
import re
import select
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
import trio

from ..sandbox.cgroups import JobCgroup
from ..sandbox.spawner import DirectSpawner, Reaped, Spawner

log = structlog.get_logger(__name__)

PROGRESS_RE = re.compile(rb"^AITBC_PROGRESS\s+(\d{1,3})(?:\s+(.{0,200}))?")
ProgressFn = Callable[[int, str], None]
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


class Ending(StrEnum):
    EXITED = "exited"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ProcessResult:
    ending: Ending
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    cpu_s: float
    max_rss_mb: int
    wall_s: float
    log_bytes: int
    log_dropped: int
    oom_killed: bool = False


@dataclass(frozen=True)
class Spawn:
    argv: Sequence[str]
    cwd: Path
    env: Mapping[str, str]
    log_path: Path
    timeout_s: float
    kill_grace_s: float = 10.0
    log_cap_bytes: int = 16 * 1024 * 1024
    limits: Mapping[str, Any] = field(default_factory=dict)  # fork-server limits (sandbox.limits)


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("killpg_denied", pgid=pgid, sig=sig)
        return False


class _LogPump:
    """Copies the job's output to exec.log up to a cap; finds progress lines."""

    def __init__(self, fd: int, log_path: Path, cap: int, on_progress: ProgressFn | None) -> None:
        self.stream = trio.lowlevel.FdStream(fd)
        self.log_path = log_path
        self.cap = cap
        self.on_progress = on_progress
        self.written = 0
        self.dropped = 0
        self._line = b""
        self.done = trio.Event()

    async def run(self) -> None:
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            while True:
                try:
                    chunk = await self.stream.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                if not chunk:
                    break
                room = self.cap - self.written
                if room > 0:
                    os.write(fd, chunk[:room])
                    self.written += min(room, len(chunk))
                self.dropped += max(0, len(chunk) - max(room, 0))
                if self.on_progress is not None:
                    self._scan(chunk)
            if self.dropped:
                os.write(fd, f"\n[aitbc-miner: {self.dropped} bytes of output dropped]\n".encode())
        finally:
            os.close(fd)
            await self.stream.aclose()
            self.done.set()

    def _scan(self, chunk: bytes) -> None:
        data = self._line + chunk
        *lines, self._line = data.split(b"\n")
        self._line = self._line[-4096:]
        for line in lines:
            m = PROGRESS_RE.match(line)
            if m and self.on_progress is not None:
                pct = max(0, min(100, int(m.group(1))))
                note = (m.group(2) or b"").decode("utf-8", "replace").strip()
                self.on_progress(pct, note)


async def _wait_exit(pidfd: int, deadline: float, cancel: trio.Event) -> Ending:
    ending = Ending.TIMEOUT
    async with trio.open_nursery() as nursery:

        async def exited() -> None:
            nonlocal ending
            await trio.lowlevel.wait_readable(pidfd)
            ending = Ending.EXITED
            nursery.cancel_scope.cancel()

        async def cancelled() -> None:
            nonlocal ending
            await cancel.wait()
            ending = Ending.CANCELLED
            nursery.cancel_scope.cancel()

        nursery.start_soon(exited)
        nursery.start_soon(cancelled)
        await trio.sleep_until(deadline)
        nursery.cancel_scope.cancel()
    return ending


async def run_process(
    spawn: Spawn,
    *,
    cancel: trio.Event,
    spawner: Spawner | None = None,
    cgroup: JobCgroup | None = None,
    on_progress: ProgressFn | None = None,
    on_started: Callable[[int], Awaitable[None]] | None = None,
) -> ProcessResult:
    """Run `spawn.argv` to completion, timeout or cancel; never leaves its processes behind.

    The leader stays a zombie (nobody reaps it) until its group and cgroup have
    been killed, so neither the pgid nor the pid can have been reused by then.
    """
    spawner = spawner or DirectSpawner()
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    started = time.monotonic()
    try:
        pid = await spawner.start(
            spawn.argv, spawn.env, str(spawn.cwd), write_fd, dict(spawn.limits)
        )
    except OSError:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    pgid = pid
    pidfd = os.pidfd_open(pid)
    pump = _LogPump(read_fd, spawn.log_path, spawn.log_cap_bytes, on_progress)
    reaped: Reaped | None = None
    ending = Ending.CANCELLED
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            try:
                if on_started is not None:
                    await on_started(pgid)
                ending = await _wait_exit(pidfd, trio.current_time() + spawn.timeout_s, cancel)
            finally:
                with trio.CancelScope(shield=True):
                    if not _exited(pidfd):
                        forced = await _terminate(pgid, pidfd, spawn.kill_grace_s)
                        log.info("job_process_group_killed", pgid=pgid, forced=forced)
                    # The leader is a zombie now: its pgid is still reserved, so this
                    # reaches only the job's own stragglers, never a reused group.
                    _killpg(pgid, signal.SIGKILL)
                    if cgroup is not None:  # and whatever escaped the group (setsid, double fork)
                        await trio.to_thread.run_sync(cgroup.kill)
                    try:
                        reaped = await spawner.reap(pid)
                    except OSError as exc:  # the fork server died with our child: status lost
                        log.error("job_reap_failed", pid=pid, error=str(exc))
                        reaped = Reaped(signal.SIGKILL, 0.0, 0)
                    # Output still buffered in the pipe is drained; a writer that
                    # escaped everything must not hold us forever.
                    with trio.move_on_after(1.0):
                        await pump.done.wait()
                    nursery.cancel_scope.cancel()
    finally:
        os.close(pidfd)
    assert reaped is not None
    code = os.waitstatus_to_exitcode(reaped.status)
    peak = cgroup.peak_memory_mb() if cgroup is not None else None
    return ProcessResult(
        ending=ending,
        exit_code=code if code >= 0 else None,
        signal=-code if code < 0 else None,
        cpu_s=round(reaped.cpu_s, 3),
        max_rss_mb=peak if peak is not None else reaped.maxrss_kb // 1024,
        wall_s=round(time.monotonic() - started, 3),
        log_bytes=pump.written,
        log_dropped=pump.dropped,
        oom_killed=cgroup.oom_killed() if cgroup is not None else False,
    )


def _exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


async def _terminate(pgid: int, pidfd: int, grace_s: float) -> bool:
    """SIGTERM the group, wait up to `grace_s` for the leader, then SIGKILL. True if forced."""
    _killpg(pgid, signal.SIGTERM)
    with trio.move_on_after(grace_s):
        await trio.lowlevel.wait_readable(pidfd)
        return False
    _killpg(pgid, signal.SIGKILL)
    await trio.lowlevel.wait_readable(pidfd)
    return True
