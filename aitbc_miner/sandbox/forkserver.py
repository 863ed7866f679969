"""Fork server: starts job processes with their limits applied between fork and exec.

Runs as its own single-threaded process (`python -I -S forkserver.py FD`),
standard library only, started once by the daemon. The daemon is threaded,
so it must not run Python between fork and exec (no preexec_fn); this process
has no threads, so its forked child may: setsid, umask 077, join the job's
cgroups, a private network namespace with only loopback, setrlimit, nice,
ionice, PR_SET_NO_NEW_PRIVS, PR_SET_PDEATHSIG, a Landlock filesystem view
limited to the job's own workspace and the system directories, then execve.

The first half (`prepare`: session, cgroups, network namespace) does not
depend on the job, and it is the slow half: a `cgroup.procs` move waits for an
RCU grace period (~10 ms per hierarchy on an idle host). So the daemon asks
for a *stem* ahead of time: a child that has done `prepare` inside a spare
cgroup and waits; the job's spawn then costs only `finish` + exec. A spawn
without a stem (or whose stem does not fit its limits) forks cold.

Protocol on a SOCK_SEQPACKET socket, one JSON object per message:
  daemon → {"op": "prestart", "cgroup_procs", "netns"}
  server → {"op": "prestarted", "pid"}
  daemon → {"op": "spawn", "argv", "env", "cwd", "limits": {..., "stem"?}} + SCM_RIGHTS [stdout fd]
  server → {"op": "spawned", "pid"} | {"op": "error", "errno", "error"}
  daemon → {"op": "discard", "pid"}            (an unused stem)
  server → {"op": "discarded", "pid"}
  daemon → {"op": "reap", "pid"}
  server → {"op": "reaped", "pid", "status", "utime", "stime", "maxrss_kb"}
Children are never reaped until the daemon asks: while the leader is a zombie
its pid and process group stay reserved, so killing the group is always safe.
Exits when the daemon closes the socket or dies (PR_SET_PDEATHSIG); stems and
jobs die with it the same way.
"""

import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import sys

PR_SET_PDEATHSIG = 1
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
LL_READ = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR

SERVER_PID = os.getpid()  # forked children check that their parent is still this process
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
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
            with open(f"/proc/self/{name}", "w") as fh:
                fh.write(text)
    loopback_up()


def landlock_abi() -> int:
    abi = _libc.syscall(LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return abi if abi > 0 else 0


def landlock(rules: dict) -> None:
    """Confine the filesystem view: `read` paths read/execute only, `write` paths full access.

    Everything else (other jobs' workspaces, the daemon's state, home directories)
    is out of reach, whatever the uid. Needs PR_SET_NO_NEW_PRIVS first.
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
    attr = struct.pack("QQQ", handled, 0, 0)
    ruleset = _libc.syscall(
        LL_CREATE, ctypes.c_char_p(attr), ctypes.c_size_t(8), ctypes.c_uint32(0)
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


def exec_result(pid: int, err_r: int) -> dict:
    """Wait until the child has exec'd (its end of the close-on-exec pipe closes) or failed."""
    chunks = []
    while True:
        data = os.read(err_r, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(err_r)
    if chunks:  # exec never happened
        os.waitpid(pid, 0)
        reply = json.loads(b"".join(chunks))
        return {"op": "error", "errno": reply["errno"], "error": reply["error"]}
    return {"op": "spawned", "pid": pid}


def spawn(req: dict, out_fd: int) -> dict:
    """Cold start: fork, do both halves in the child, exec."""
    limits = req.get("limits", {})
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
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
    so a job start costs only `finish()` and exec.
    """

    def __init__(self, pre: dict, keep_closed: list[int]) -> None:
        self.pre = {
            "cgroup_procs": list(pre.get("cgroup_procs", [])),
            "netns": bool(pre.get("netns")),
        }
        self.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.err_r, err_w = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
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
        early: BaseException | None = None
        try:
            prepare(self.pre)
        except BaseException as exc:  # reported when a job asks for this stem
            early = exc
        data, ancdata, _, _ = ctl.recvmsg(1 << 20, socket.CMSG_SPACE(16), socket.MSG_CMSG_CLOEXEC)
        if not data:  # discarded
            os._exit(0)
        if early is not None:
            raise early
        req = json.loads(data)
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

    def spawn(self, req: dict, out_fd: int) -> dict:
        try:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", out_fd))]
            self.ctl.sendmsg([json.dumps(req).encode()], anc)
        except OSError:  # the stem is gone (killed from outside): start cold instead
            self.discard()
            return spawn(req, out_fd)
        finally:
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
            try:
                reply = self.handle(json.loads(data), fds)
            except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
                reply = {
                    "op": "error",
                    "errno": getattr(exc, "errno", None) or errno.EINVAL,
                    "error": str(exc),
                }
            finally:
                for fd in fds:
                    os.close(fd)
            self.sock.send(json.dumps(reply).encode())


def main() -> int:
    global SERVER_PID
    SERVER_PID = os.getpid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the daemon died: so do we (and, in turn, the jobs)
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
