"""Fork server: starts job processes with their limits applied between fork and exec.

Runs as its own single-threaded process (`python -I -S forkserver.py FD [EXEC_TIMEOUT_S]`),
standard library only, started once by the daemon. The daemon is threaded,
so it must not run Python between fork and exec (no preexec_fn); this process
has no threads, so its forked child may: setsid, umask 077, join the job's
cgroups, a private network namespace with only loopback, setrlimit, nice,
ionice, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, a Landlock filesystem view
limited to the job's own workspace and the system directories (ABI >= 6: also
signals and abstract unix sockets scoped to the job's own processes; ABI >= 4,
when asked for hosts without namespaces: no TCP bind/connect), then execve.

The first half (`prepare`: session, cgroups, network namespace) does not
depend on the job, and it is the slow half: a `cgroup.procs` move waits for an
RCU grace period (~10 ms per hierarchy on an idle host). So the daemon asks
for a *stem* ahead of time: a child that has done `prepare` inside a spare
cgroup and waits; the job's spawn then costs only `finish` + exec. A spawn
without a stem (or whose stem does not fit its limits) forks cold.

Protocol on a SOCK_SEQPACKET socket, one JSON object per message. The server
speaks first; every request carries an "id" that its reply echoes (the client
drops a server whose reply does not match), and any request may be answered
{"op": "error", "errno", "error", "id"}:
  server → {"op": "hello", "pid", "netns": "ok"|"unavailable", "landlock": <ABI>}
  daemon → {"op": "prestart", "cgroup_procs", "netns"}
  server → {"op": "prestarted", "pid"}
  daemon → {"op": "spawn", "argv", "env", "cwd", "limits": {..., "stem"?}} + SCM_RIGHTS [stdout fd]
  server → {"op": "spawned", "pid"}
  daemon → {"op": "discard", "pid"}            (an unused stem; any other pid: no-op)
  server → {"op": "discarded", "pid"}
  daemon → {"op": "reap", "pid"}               (refused for an unused stem)
  server → {"op": "reaped", "pid", "status", "utime", "stime", "maxrss_kb"}
A pid handed out in a "spawned" reply is never reaped until the daemon asks:
while the leader is a zombie its pid and process group stay reserved, so
killing the group is always safe. (The server reaps on its own only children
that never exec'd: failed starts, discarded or unusable stems.) Every wait of
the server is bounded (EXEC_TIMEOUT_S): a child or stem that neither execs nor
fails in time (e.g. stopped by a job of the same uid) is killed and the spawn
answered with ETIMEDOUT. A stem that failed its setup, died, or does not fit
the request is discarded and the job forked cold.
Exits when the daemon closes the socket or dies (PR_SET_PDEATHSIG); stems and
jobs die with it the same way. Not dumpable (nor its children until exec).
"""

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
IOPRIO_CLASS = {"best-effort": 2, "idle": 3}
IOPRIO_SET = {
    "x86_64": 251,
    "aarch64": 30,
    "i686": 289,
    "armv7l": 314,
    "ppc64le": 273,
    "s390x": 282,
}
RLIMITS = {
    "AS": resource.RLIMIT_AS,
    "DATA": resource.RLIMIT_DATA,
    "NOFILE": resource.RLIMIT_NOFILE,
    "NPROC": resource.RLIMIT_NPROC,
    "FSIZE": resource.RLIMIT_FSIZE,
    "CORE": resource.RLIMIT_CORE,
}
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
# Landlock (same syscall numbers on every architecture)
LL_CREATE, LL_ADD_RULE, LL_RESTRICT = 444, 445, 446
LL_RULE_PATH_BENEATH = 1
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_ALL_V1 = (1 << 13) - 1  # execute .. make_sym
LL_REFER, LL_TRUNCATE, LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
# ABI 6 (Linux 6.12): no signals to, and no abstract unix sockets of, processes outside
# the job's own domain (the daemon, the fork server, stems, other jobs).
LL_SCOPE_ABSTRACT_UNIX_SOCKET, LL_SCOPE_SIGNAL = 1, 2
# ABI 4 (Linux 6.7): TCP bind/connect, handled without rules = denied.
LL_NET_BIND_TCP, LL_NET_CONNECT_TCP = 1, 2
LL_READ = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR

SERVER_PID = os.getpid()  # forked children check that their parent is still this process
# How long the server waits for a child to exec, or for a stem to be ready, before it
# kills it: a child stopped with SIGSTOP (jobs run under the same uid) must not
# stall every later start. argv[2] overrides it (tests).
EXEC_TIMEOUT_S = 10.0
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), "prctl")


def ioprio_set(io_class: str, level: int) -> None:
    number = IOPRIO_SET.get(os.uname().machine)
    if number is None:
        return  # unknown architecture: nice still applies
    value = (IOPRIO_CLASS[io_class] << 13) | (level if io_class == "best-effort" else 0)
    _check(_libc.syscall(number, 1, 0, value), "ioprio_set")  # IOPRIO_WHO_PROCESS, self


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, SIOCGIFFLAGS, ifreq))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def private_network() -> None:
    """A new network namespace with only loopback; via a user namespace when unprivileged."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    else:
        _check(_libc.unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare(CLONE_NEWUSER|CLONE_NEWNET)")
        # Map our own ids only: after exec the job holds no capabilities at all.
        # /proc/self is root-owned while we are not dumpable: dumpable just for this.
        prctl(PR_SET_DUMPABLE, 1)
        try:
            for name, text in (
                ("setgroups", "deny"),
                ("uid_map", f"{uid} {uid} 1"),
                ("gid_map", f"{gid} {gid} 1"),
            ):
                with open(f"/proc/self/{name}", "w") as fh:
                    fh.write(text)
        finally:
            prctl(PR_SET_DUMPABLE, 0)
    loopback_up()


def landlock_abi() -> int:
    abi = _libc.syscall(LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return abi if abi > 0 else 0


def landlock(rules: dict) -> None:
    """Confine the filesystem view: `read` paths read/execute only, `write` paths full access.

    Everything else (other jobs' workspaces, the daemon's state, home directories)
    is out of reach, whatever the uid. From ABI 6 on, the job can also signal and
    reach abstract unix sockets of its own processes only. Needs
    PR_SET_NO_NEW_PRIVS first.
    """
    abi = landlock_abi()
    if abi == 0:
        raise OSError(errno.ENOSYS, "landlock is not available")
    handled = LL_ALL_V1
    if abi >= 2:
        handled |= LL_REFER
    if abi >= 3:
        handled |= LL_TRUNCATE
    if abi >= 5:
        handled |= LL_IOCTL_DEV
    scoped = LL_SCOPE_ABSTRACT_UNIX_SOCKET | LL_SCOPE_SIGNAL if abi >= 6 else 0
    # TCP only when asked (no network namespace on this host); a netns does it better.
    net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP if rules.get("deny_tcp") and abi >= 4 else 0
    if rules.get("deny_tcp") and not net:
        raise OSError(errno.ENOSYS, "landlock cannot restrict TCP on this kernel (ABI < 4)")
    attr = struct.pack("QQQ", handled, net, scoped)  # fs, net, scope
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _libc.syscall(
        LL_CREATE, ctypes.c_char_p(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    try:
        for access, paths in ((LL_READ, rules.get("read", [])), (handled, rules.get("write", []))):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    allowed = access
                    if not os.path.isdir(path):  # file rules take file rights only
                        allowed &= (
                            LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV
                        )
                    beneath = struct.pack("=Qi", allowed & handled, fd)
                    _check(
                        _libc.syscall(
                            LL_ADD_RULE, ruleset, LL_RULE_PATH_BENEATH, ctypes.c_char_p(beneath), 0
                        ),
                        f"landlock_add_rule {path}",
                    )
                finally:
                    os.close(fd)
        _check(_libc.syscall(LL_RESTRICT, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def default_signals() -> None:
    """Undo what Python did to this process: ignored dispositions survive exec.

    (CPython ignores SIGPIPE and SIGXFSZ; the server ignores SIGINT. A job must
    die of SIGXFSZ at its file size cap and of SIGPIPE in a broken pipe.)
    """
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def prepare(limits: dict) -> None:
    """The job-independent half, in the child: new session, its cgroups, its network."""
    default_signals()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the server died: so do we
    if os.getppid() != SERVER_PID:  # ... before the line above took effect
        os._exit(1)
    os.setsid()
    os.umask(0o077)
    for path in limits.get("cgroup_procs", []):
        with open(path, "w") as fh:
            fh.write(str(os.getpid()))
    if limits.get("netns"):
        private_network()


def finish(limits: dict) -> None:
    """The per-job half, in the child, right before exec. Raises on any failure."""
    for name, (soft, hard) in limits.get("rlimits", {}).items():
        resource.setrlimit(RLIMITS[name], (soft, hard))
    if "nice" in limits:
        os.setpriority(os.PRIO_PROCESS, 0, int(limits["nice"]))
    if "ioprio" in limits:
        ioprio_set(limits["ioprio"][0], int(limits["ioprio"][1]))
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # again: credential changes may have cleared it
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if limits.get("landlock"):
        landlock(limits["landlock"])


def execute(req: dict, out_fd: int) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.chdir(req["cwd"])
    os.execve(req["argv"][0], req["argv"], req["env"])  # noqa: S606 - never a shell


def fail(err_w: int, exc: BaseException) -> None:
    """Report why exec never happened and die; never return into the server loop."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EPERM
    try:
        os.write(err_w, json.dumps({"errno": code, "error": str(exc)[:500]}).encode())
    finally:
        os._exit(127)


def readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))


def exec_result(pid: int, err_r: int) -> dict:
    """Wait until the child has exec'd (its end of the close-on-exec pipe closes) or failed.

    A child that neither execs nor fails within EXEC_TIMEOUT_S (stopped, or stuck in
    the kernel) is killed and reaped, so the server answers and stays in step.
    """
    chunks = []
    deadline = time.monotonic() + EXEC_TIMEOUT_S
    try:
        while True:
            if not readable(err_r, deadline - time.monotonic()):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return {"op": "error", "errno": errno.ETIMEDOUT, "error": "the job did not start"}
            data = os.read(err_r, 4096)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(err_r)
    if chunks:  # exec never happened
        os.waitpid(pid, 0)
        reply = json.loads(b"".join(chunks))
        return {"op": "error", "errno": reply["errno"], "error": reply["error"]}
    return {"op": "spawned", "pid": pid}


def fork_or_close(*fds: int) -> int:
    """os.fork(), closing `fds` if it fails (EAGAIN under TasksMax/RLIMIT_NPROC)."""
    try:
        return os.fork()
    except OSError:
        for fd in fds:
            os.close(fd)
        raise


def spawn(req: dict, out_fd: int) -> dict:
    """Cold start: fork, do both halves in the child, exec."""
    limits = req.get("limits", {})
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = fork_or_close(err_r, err_w)
    if pid == 0:  # child: no return from this block
        try:
            os.close(err_r)
            prepare(limits)
            finish(limits)
            execute(req, out_fd)
        except BaseException as exc:
            fail(err_w, exc)
    os.close(err_w)
    return exec_result(pid, err_r)


class Stem:
    """A child forked ahead of time that has done `prepare()` and waits for its job.

    Joining a cgroup waits for an RCU grace period (~10 ms on an idle host) and
    a network namespace costs ~1.5 ms; a stem pays both before the job exists,
    so a job start costs only `finish()` and exec. Once prepared it says so on
    its socket ("ready", or why not); the server hands a job only to a ready stem
    and starts the job cold otherwise.
    """

    def __init__(self, pre: dict, keep_closed: list[int]) -> None:
        self.pre = self.prepared_part(pre)
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.err_r, err_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.pid = fork_or_close(self.err_r, err_w)
        except OSError:
            self.ctl.close()
            theirs.close()
            raise
        if self.pid == 0:  # child: no return from this block
            try:
                os.close(self.err_r)
                self.ctl.close()
                for fd in keep_closed:  # the server's socket and other stems' ends
                    os.close(fd)
                self._wait_and_exec(theirs, err_w)
            except BaseException as exc:
                fail(err_w, exc)
        theirs.close()
        os.close(err_w)

    def _wait_and_exec(self, ctl: socket.socket, err_w: int) -> None:
        try:
            prepare(self.pre)
        except BaseException as exc:
            ctl.send(json.dumps({"ready": False, "error": str(exc)[:500]}).encode())
            os._exit(1)
        ctl.send(b'{"ready": true}')
        data, ancdata, _, _ = ctl.recvmsg(1 << 20, socket.CMSG_SPACE(16), socket.MSG_CMSG_CLOEXEC)
        if not data:  # discarded
            os._exit(0)
        req = json.loads(data)
        # Still where we were put? Without Landlock a job of the same uid could have
        # moved this waiting process; then pay for the move again rather than run outside.
        pid = str(os.getpid())
        for path in self.pre["cgroup_procs"]:
            with open(path) as fh:
                inside = pid in fh.read().split()
            if not inside:
                with open(path, "w") as fh:
                    fh.write(pid)
        finish(req.get("limits", {}))
        execute(req, received_fds(ancdata)[0])

    @staticmethod
    def prepared_part(limits: dict) -> dict:
        return {
            "cgroup_procs": list(limits.get("cgroup_procs", [])),
            "netns": bool(limits.get("netns")),
        }

    def fits(self, limits: dict) -> bool:
        return self.pre == self.prepared_part(limits)

    def ready(self) -> bool:
        """Wait (bounded) for the stem to finish `prepare()`; False if it failed or died."""
        if not readable(self.ctl.fileno(), EXEC_TIMEOUT_S):
            return False
        try:
            data = self.ctl.recv(4096)
            return bool(data) and json.loads(data).get("ready") is True
        except (OSError, ValueError, AttributeError):
            return False

    def spawn(self, req: dict, out_fd: int) -> dict:
        """Hand the job to this stem, or start it cold if the stem is not usable."""
        if not self.ready():
            self.discard()
            return spawn(req, out_fd)
        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", out_fd))]
            self.ctl.sendmsg([json.dumps(req).encode()], anc)
        except OSError:  # died since it said ready
            self.discard()
            return spawn(req, out_fd)
        self.ctl.close()
        return exec_result(self.pid, self.err_r)

    def discard(self) -> None:
        self.ctl.close()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.err_r)


def reap(pid: int) -> dict:
    _, status, usage = os.wait4(pid, 0)
    return {
        "op": "reaped",
        "pid": pid,
        "status": status,
        "utime": usage.ru_utime,
        "stime": usage.ru_stime,
        "maxrss_kb": usage.ru_maxrss,
    }


def probe_netns() -> str:
    """Can this host give a job a private network namespace? (checked once at start)"""
    pid = os.fork()
    if pid == 0:
        try:
            private_network()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return "ok" if os.waitstatus_to_exitcode(status) == 0 else "unavailable"


def received_fds(ancdata: list) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
    return fds


class Server:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.stems: dict[int, Stem] = {}

    def handle(self, req: dict, fds: list[int]) -> dict:
        op = req["op"]
        if op == "spawn":
            if not fds:
                raise OSError(errno.EINVAL, "spawn without a stdout descriptor")
            stem = self.stems.pop(int(req["limits"].pop("stem", 0) or 0), None)
            if stem is None:
                return spawn(req, fds[0])
            if not stem.fits(req["limits"]):  # never hand a job a setup it did not ask for
                stem.discard()
                return spawn(req, fds[0])
            return stem.spawn(req, fds[0])
        if op == "prestart":
            held = [self.sock.fileno()]
            for other in self.stems.values():
                held += [other.ctl.fileno(), other.err_r]
            stem = Stem(req, held)
            self.stems[stem.pid] = stem
            return {"op": "prestarted", "pid": stem.pid}
        if op == "discard":
            stem = self.stems.pop(int(req["pid"]), None)
            if stem is not None:
                stem.discard()
            return {"op": "discarded", "pid": int(req["pid"])}
        if op == "reap":
            if int(req["pid"]) in self.stems:
                raise OSError(errno.EINVAL, "that pid is an unused stem")
            return reap(int(req["pid"]))
        return {"op": "error", "errno": errno.EINVAL, "error": f"unknown op {op!r}"}

    def serve(self) -> None:
        hello = {
            "op": "hello",
            "pid": os.getpid(),
            "netns": probe_netns(),
            "landlock": landlock_abi(),
        }
        self.sock.send(json.dumps(hello).encode())
        while True:
            try:
                # MSG_CMSG_CLOEXEC: the job's stdout pipe must not leak into it as a 4th fd.
                data, ancdata, _, _ = self.sock.recvmsg(
                    1 << 20, socket.CMSG_SPACE(16), socket.MSG_CMSG_CLOEXEC
                )
            except InterruptedError:
                continue
            if not data:
                return
            fds = received_fds(ancdata)
            req_id = None
            try:
                req = json.loads(data)
                req_id = req.get("id")
                reply = self.handle(req, fds)
            except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                reply = {
                    "op": "error",
                    "errno": getattr(exc, "errno", None) or errno.EINVAL,
                    "error": str(exc),
                }
            finally:
                for fd in fds:
                    os.close(fd)
            reply["id"] = req_id  # the client checks it: a reply never answers another request
            self.sock.send(json.dumps(reply).encode())


def main() -> int:
    global SERVER_PID, EXEC_TIMEOUT_S
    SERVER_PID = os.getpid()
    if len(sys.argv) > 2:
        EXEC_TIMEOUT_S = float(sys.argv[2])
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the daemon died: so do we (and, in turn, the jobs)
    # Not dumpable, and so neither are stems and children until exec: a job of the same
    # uid cannot read or write their memory through /proc/<pid>/mem.
    prctl(PR_SET_DUMPABLE, 0)
    if os.getppid() == 1:
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    sock = socket.socket(fileno=int(sys.argv[1]))
    # Inherited from the daemon (pass_fds), so inheritable: a job holding this
    # socket could read the daemon's requests and forge replies. Never past exec.
    sock.set_inheritable(False)
    Server(sock).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
