"""How job processes are started: through the fork server (limits) or directly.

I/O: processes and a socket. Both spawners hand back a pid that stays a
zombie until `reap()`, so runners/base.py can watch it through a pidfd and
kill its process group while the group id is still reserved.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog
import trio

log = structlog.get_logger(__name__)

FORKSERVER = Path(__file__).with_name("forkserver.py")


@dataclass(frozen=True)
class Reaped:
    status: int
    cpu_s: float
    maxrss_kb: int


class Spawner(Protocol):
    async def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        out_fd: int,
        limits: dict[str, Any],
    ) -> int: ...

    async def reap(self, pid: int) -> Reaped: ...


class DirectSpawner:
    """Popen in its own session; applies no limits (tools and tests only)."""

    def __init__(self) -> None:
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    async def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        out_fd: int,
        limits: dict[str, Any],
    ) -> int:
        proc = subprocess.Popen(  # argv from validated parts only; never a shell
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out_fd,
            stderr=out_fd,
            close_fds=True,
            start_new_session=True,
            umask=0o077,
        )
        self._procs[proc.pid] = proc
        return proc.pid

    async def reap(self, pid: int) -> Reaped:
        _, status, usage = os.wait4(pid, 0)
        proc = self._procs.pop(pid, None)
        if proc is not None:
            proc.returncode = os.waitstatus_to_exitcode(status)
        return Reaped(status, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


class ForkServerError(OSError):
    pass


class ForkServer:
    """Client of the fork server process; one request at a time."""

    def __init__(self, python: str = sys.executable) -> None:
        self._python = python
        self._sock: trio.socket.SocketType | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = trio.Lock()
        self.netns = "unavailable"
        self.landlock_abi = 0
        self._stems: set[int] = set()  # prestarted and not yet used or discarded

    async def open(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # -I -S: isolated and without site: the server needs only the stdlib.
            self._proc = subprocess.Popen(
                [self._python, "-I", "-S", str(FORKSERVER), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                close_fds=True,
                # Nothing of the daemon's environment (MINER_AUTH!) reaches the server.
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
            )
        finally:
            theirs.close()
        self._sock = trio.socket.from_stdlib_socket(ours)
        hello = await self._receive()
        self.netns = hello.get("netns", "unavailable")
        self.landlock_abi = int(hello.get("landlock", 0))
        log.debug("forkserver_started", pid=hello.get("pid"), netns=self.netns)

    async def aclose(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            proc = self._proc
            self._proc = None
            with trio.move_on_after(2):
                await trio.to_thread.run_sync(proc.wait)
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    async def _receive(self) -> dict[str, Any]:
        assert self._sock is not None
        data = await self._sock.recv(1 << 20)
        if not data:
            raise ForkServerError(errno.EPIPE, "fork server exited")
        return json.loads(data)

    async def _call(self, request: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        if self._proc is not None and self._proc.poll() is not None:
            log.error("forkserver_died", exit_code=self._proc.returncode, action="restart")
            self._stems.clear()  # they died with it
            await self.aclose()
            await self.open()
        if self._sock is None:
            raise ForkServerError(errno.EPIPE, "fork server is not running")
        # Shielded: a request cancelled half-way would leave its answer to be read
        # by the next caller. The server answers in milliseconds; the bound is for a hung one.
        with trio.CancelScope(shield=True), trio.fail_after(30):
            async with self._lock:
                payload = json.dumps(request).encode()
                if fds:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
                    await self._sock.sendmsg([payload], anc)
                else:
                    await self._sock.send(payload)
                reply = await self._receive()
        if reply.get("op") == "error":
            raise ForkServerError(int(reply.get("errno") or errno.EIO), str(reply.get("error")))
        return reply

    async def start(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str,
        out_fd: int,
        limits: dict[str, Any],
    ) -> int:
        """Start a job; `limits["stem"]` names a prestarted stem to use (else it forks cold)."""
        limits = dict(limits)
        stem = limits.pop("stem", None)
        if stem in self._stems:  # a stem of an earlier server incarnation is not passed on
            self._stems.discard(stem)
            limits["stem"] = stem
        reply = await self._call(
            {"op": "spawn", "argv": list(argv), "env": dict(env), "cwd": cwd, "limits": limits},
            [out_fd],
        )
        return int(reply["pid"])

    async def prestart(self, cgroup_procs: Sequence[str], netns: bool) -> int:
        """Fork a stem that joins `cgroup_procs` (and a private netns) before any job exists."""
        reply = await self._call(
            {"op": "prestart", "cgroup_procs": list(cgroup_procs), "netns": netns}
        )
        pid = int(reply["pid"])
        self._stems.add(pid)
        return pid

    def unused(self, pid: int) -> bool:
        return pid in self._stems

    async def discard(self, pid: int) -> None:
        """Kill and reap a stem that no job used (no-op when a job already did)."""
        if pid in self._stems:
            self._stems.discard(pid)
            await self._call({"op": "discard", "pid": pid})

    async def reap(self, pid: int) -> Reaped:
        reply = await self._call({"op": "reap", "pid": pid})
        return Reaped(
            int(reply["status"]),
            float(reply["utime"]) + float(reply["stime"]),
            int(reply["maxrss_kb"]),
        )
