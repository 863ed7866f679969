"""How job processes are started: through the fork server (limits) or directly.

I/O: processes and a socket. Both spawners hand back a pid that stays a
zombie until `reap()`, so runners/base.py can watch it through a pidfd and
kill its process group while the group id is still reserved.
"""

from __future__ import annotations

import array
import errno
import itertools
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


StemRef = tuple[int, int]  # (pid, token): a token tells a stem from a later one with its pid
EXEC_TIMEOUT_S = 10.0  # the server's bound on a child's exec or a stem's readiness
CALL_TIMEOUT_S = 2 * EXEC_TIMEOUT_S + 10  # a spawn may wait for both


class ForkServer:
    """Client of the fork server process; one request at a time."""

    def __init__(self, python: str = sys.executable, exec_timeout_s: float = EXEC_TIMEOUT_S):
        self._python = python
        self._exec_timeout_s = exec_timeout_s
        self._sock: trio.socket.SocketType | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = trio.Lock()
        self.netns = "unavailable"
        self.landlock_abi = 0
        self._stems: dict[int, int] = {}  # pid -> token, prestarted and not used or discarded
        self._seq = itertools.count(1)
        self._closed = False

    async def open(self) -> None:
        self._closed = False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # -I -S: isolated and without site: the server needs only the stdlib.
            self._proc = subprocess.Popen(
                [
                    self._python,
                    "-I",
                    "-S",
                    str(FORKSERVER),
                    str(theirs.fileno()),
                    str(self._exec_timeout_s),
                ],
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
        """Stop the server for good (shutdown); later calls fail instead of restarting it."""
        self._closed = True
        await self._stop()

    async def _stop(self) -> None:
        self._stems.clear()  # they die with the server
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
        reply = json.loads(data)
        if not isinstance(reply, dict):
            raise ValueError("fork server reply is not an object")
        return reply

    def _break(self, why: str) -> None:
        """The exchange broke half-way: no later request may read its answer.

        Kill the server (and with it, through PDEATHSIG, its stems and running jobs);
        the next call starts a fresh one.
        """
        log.error("forkserver_out_of_step", reason=why, action="restart")
        self._stems.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    async def _call(self, request: dict[str, Any], fds: Sequence[int] = ()) -> dict[str, Any]:
        # Shielded: a request cancelled half-way would leave its answer to be read
        # by the next caller. Every wait of the server is bounded, so is this.
        with trio.CancelScope(shield=True):
            async with self._lock:
                if self._closed:
                    raise ForkServerError(errno.EPIPE, "fork server is closed")
                if self._proc is None or self._proc.poll() is not None:
                    if self._proc is not None:
                        log.error("forkserver_died", exit_code=self._proc.returncode)
                    await self._stop()
                    await self.open()
                assert self._sock is not None
                request = {**request, "id": next(self._seq)}
                try:
                    with trio.fail_after(CALL_TIMEOUT_S):
                        payload = json.dumps(request).encode()
                        if fds:
                            rights = array.array("i", fds).tobytes()
                            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)]
                            await self._sock.sendmsg([payload], anc)
                        else:
                            await self._sock.send(payload)
                        reply = await self._receive()
                    if reply.get("id") != request["id"]:
                        raise ValueError(f"reply {reply.get('id')} to request {request['id']}")
                except (trio.TooSlowError, ValueError, OSError) as exc:
                    self._break(f"{request['op']}: {exc!r}")
                    raise ForkServerError(errno.EIO, f"fork server: {exc!r}") from None
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
        """Start a job; `limits["stem"]` (a StemRef) names a prestarted stem to use.

        Without one, or with one that is no longer this server's, it forks cold.
        """
        limits = dict(limits)
        ref = limits.pop("stem", None)
        pid = None
        if ref is not None and self._stems.get(int(ref[0])) == int(ref[1]):
            pid = int(ref[0])
            limits["stem"] = pid
        try:
            reply = await self._call(
                {"op": "spawn", "argv": list(argv), "env": dict(env), "cwd": cwd, "limits": limits},
                [out_fd],
            )
        finally:
            if pid is not None:  # the server used or dropped it either way
                self._stems.pop(pid, None)
        return int(reply["pid"])

    async def prestart(self, cgroup_procs: Sequence[str], netns: bool) -> StemRef:
        """Fork a stem that joins `cgroup_procs` (and a private netns) before any job exists."""
        reply = await self._call(
            {"op": "prestart", "cgroup_procs": list(cgroup_procs), "netns": netns}
        )
        pid, token = int(reply["pid"]), next(self._seq)
        self._stems[pid] = token
        return pid, token

    def unused(self, ref: StemRef) -> bool:
        return self._stems.get(ref[0]) == ref[1]

    async def discard(self, ref: StemRef) -> None:
        """Kill and reap a stem that no job used (no-op when a job already did)."""
        if self.unused(ref):
            del self._stems[ref[0]]
            await self._call({"op": "discard", "pid": ref[0]})

    async def reap(self, pid: int) -> Reaped:
        reply = await self._call({"op": "reap", "pid": pid})
        return Reaped(
            int(reply["status"]),
            float(reply["utime"]) + float(reply["stime"]),
            int(reply["maxrss_kb"]),
        )
