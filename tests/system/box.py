"""A real systemd (PID 1) in a systemd-nspawn container, for the system tests.

The host's own PID 1 need not be systemd. A minimal Debian rootfs
(debootstrap, cached under /var/tmp/aitbc-miner-rootfs, rebuilt when
`ROOTFS_STAMP` changes) boots with `systemd-nspawn --boot --volatile=overlay`,
so every boot starts from the pristine rootfs and its writes go to a tmpfs.
Commands run inside through nsenter into all of the box's namespaces
(`machinectl`/`systemd-run -M` need a host systemd). Root only.

The box has no network (--private-network): Python packages come from a
wheelhouse built once on the host with /usr/bin/python3 (the same Debian
interpreter as the box's) and bound read-only into the box. The cached rootfs
also holds a venv with the mock coordinator's dependencies (/opt/aitbc-test).

Also a command line for poking at it by hand:
    python -m tests.system.box build | start | exec CMD... | stop
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("AITBC_BOX_CACHE", "/var/tmp/aitbc-miner-rootfs"))
ROOTFS = CACHE / "rootfs"
WHEELS = CACHE / "wheels"
SUITE = "bookworm"
# python3-venv: install.sh builds the miner's venv inside the box (ensurepip works
# offline); logrotate: the shipped logrotate config is checked for real.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "procps", "logrotate")
BUILD_VERSION = "1"  # bump to force a rebuild of the rootfs
ROOTFS_STAMP = f"{BUILD_VERSION} {SUITE} {','.join(PACKAGES)}"
HOST_PACKAGES = {  # binary -> Debian package the harness needs on the host
    "systemd-nspawn": "systemd-container",
    "debootstrap": "debootstrap",
    "nsenter": "util-linux",
}
# building the wheelhouse: pip, and what systemd-python compiles against
WHEEL_BUILD_PACKAGES = ("python3-pip", "python3-dev", "gcc", "pkg-config", "libsystemd-dev")
HOST_PYTHON = "/usr/bin/python3"
TEST_VENV = "/opt/aitbc-test/venv"  # in the rootfs: the mock coordinator's dependencies
BOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class BoxError(RuntimeError):
    """The box could not be built, booted or driven."""


def log(msg: str) -> None:
    print(f"[box] {msg}", file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], *, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), timeout=timeout, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


# --- can this machine boot a box at all? ------------------------------------------------


def unavailable_reason() -> str | None:
    """None when a box can be built and booted here, else why not (installs tools if it can)."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.geteuid() != 0:
        return "not root (systemd-nspawn and debootstrap need root)"
    if not Path(HOST_PYTHON).exists():
        return f"{HOST_PYTHON} missing (the wheelhouse is built with the host's Debian python)"
    missing = [pkg for binary, pkg in HOST_PACKAGES.items() if not shutil.which(binary)]
    missing += [p for p in WHEEL_BUILD_PACKAGES if not _deb_installed(p)]
    if missing:
        if not shutil.which("apt-get"):
            return f"missing {', '.join(missing)} and no apt-get to install them"
        log(f"installing host packages: {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], env=env)
        r = _run(["apt-get", "install", "-y", "-qq", *sorted(set(missing))], env=env)
        if r.returncode != 0:
            return f"apt-get install {' '.join(missing)} failed: {r.stderr.strip()[-300:]}"
    if not Path("/sys/fs/cgroup").is_dir():
        return "no /sys/fs/cgroup"
    return None


def _deb_installed(pkg: str) -> bool:
    r = _run(["dpkg-query", "-W", "-f", "${Status}", pkg])
    return r.returncode == 0 and "install ok installed" in r.stdout


def apt_mirror() -> str:
    """The Debian archive this machine's apt already uses (never the security one)."""
    if os.environ.get("AITBC_BOX_MIRROR"):
        return os.environ["AITBC_BOX_MIRROR"]
    uris: list[str] = []
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        uris += [ln.split()[1] for ln in f.read_text().splitlines() if ln.startswith("URIs:")]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        uris += [ln.split()[1] for ln in legacy.read_text().splitlines() if ln.startswith("deb ")]
    for uri in uris:
        if "security" not in uri:
            return uri
    return "http://deb.debian.org/debian"


# --- cache: rootfs, wheelhouse, test venv ------------------------------------------------


@contextlib.contextmanager
def cache_lock(timeout: float = 900) -> Iterator[None]:
    """One box user at a time on this machine (builds, boots, cgroup clean-up)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BoxError(f"{CACHE}/.lock held by another run for {timeout}s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def requirements() -> list[str]:
    """Everything the miner ([systemd]) and the mock ([mock]) need, from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = list(project["project"]["dependencies"])
    extras = project["project"]["optional-dependencies"]
    deps += extras["systemd"] + extras["mock"]
    return sorted(set(deps))


def build_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return list(project["build-system"]["requires"])


def _stamp_ok(path: Path, stamp: str) -> bool:
    try:
        return path.read_text() == stamp
    except OSError:
        return False


def build_rootfs() -> None:
    stamp_file = ROOTFS / ".aitbc-box-stamp"
    if _stamp_ok(stamp_file, ROOTFS_STAMP):
        return
    t0 = time.monotonic()
    tmp = CACHE / "rootfs.tmp"
    for old in (tmp, ROOTFS):
        if old.exists():
            shutil.rmtree(old)
    mirror = apt_mirror()
    log(f"debootstrap {SUITE} from {mirror} (once; cached in {ROOTFS})")
    r = _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(tmp),
            mirror,
        ],
        timeout=900,
    )
    if r.returncode != 0:
        (CACHE / "debootstrap.log").write_text(r.stdout + r.stderr)
        raise BoxError(f"debootstrap failed, see {CACHE}/debootstrap.log: {r.stderr[-500:]}")
    (tmp / "etc/hostname").write_text("aitbc-box\n")
    # no getty on the passive console
    getty = tmp / "etc/systemd/system/console-getty.service"
    getty.unlink(missing_ok=True)
    getty.symlink_to("/dev/null")
    conf = tmp / "etc/systemd/system.conf.d"
    conf.mkdir(parents=True, exist_ok=True)
    # units without their own TimeoutStopSec (not ours) must not stall the box's halt
    (conf / "10-box.conf").write_text("[Manager]\nDefaultTimeoutStopSec=10s\n")
    (tmp / ".aitbc-box-stamp").write_text(ROOTFS_STAMP)
    tmp.rename(ROOTFS)
    log(f"rootfs built in {time.monotonic() - t0:.0f}s")


def _wheel_stamp() -> str:
    py = _run([HOST_PYTHON, "-c", "import sys; print(sys.version)"]).stdout.strip()
    text = json.dumps([BUILD_VERSION, py, requirements(), build_requirements()])
    return hashlib.sha256(text.encode()).hexdigest()


def build_wheelhouse() -> str:
    """Wheels for everything install.sh and the mock need, built by the host's Debian python."""
    stamp = _wheel_stamp()
    if _stamp_ok(WHEELS / ".stamp", stamp):
        return stamp
    t0 = time.monotonic()
    tmp = CACHE / "wheels.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reqs = requirements() + build_requirements()
    log(f"building the wheelhouse ({len(reqs)} requirements) with {HOST_PYTHON}")
    r = _run([HOST_PYTHON, "-m", "pip", "wheel", "-q", "-w", str(tmp), *reqs], timeout=900)
    if r.returncode != 0:
        raise BoxError(f"pip wheel failed: {r.stderr[-1500:]}")
    (tmp / "requirements.txt").write_text("\n".join(requirements()) + "\n")
    (tmp / ".stamp").write_text(stamp)
    shutil.rmtree(WHEELS, ignore_errors=True)
    tmp.rename(WHEELS)
    log(f"wheelhouse built in {time.monotonic() - t0:.0f}s")
    return stamp


def build_test_venv(stamp: str) -> None:
    """The mock coordinator's venv inside the cached rootfs (run without booting)."""
    stamp_file = ROOTFS / TEST_VENV.lstrip("/") / ".aitbc-stamp"
    if _stamp_ok(stamp_file, stamp):
        return
    t0 = time.monotonic()
    shutil.rmtree(stamp_file.parent, ignore_errors=True)
    script = (
        f"/usr/bin/python3 -m venv {TEST_VENV} && "
        f"{TEST_VENV}/bin/python -m pip install -q --no-index --find-links /opt/wheels "
        f"-r /opt/wheels/requirements.txt"
    )
    r = _run(
        [
            "systemd-nspawn",
            "-q",
            "-D",
            str(ROOTFS),
            "--register=no",
            "--keep-unit",
            "--private-network",
            f"--bind-ro={WHEELS}:/opt/wheels",
            "/bin/sh",
            "-c",
            script,
        ],
        timeout=600,
    )
    remove_nspawn_cgroups()
    if r.returncode != 0:
        raise BoxError(f"building the test venv failed: {r.stdout[-800:]}{r.stderr[-800:]}")
    stamp_file.write_text(stamp)
    log(f"test venv built in {time.monotonic() - t0:.0f}s")


def prepare() -> None:
    """Build whatever is missing or stale (call under cache_lock)."""
    build_rootfs()
    stamp = build_wheelhouse()
    build_test_venv(stamp)


# --- cgroups left behind -------------------------------------------------------------------


def _nspawn_cgroup_dirs() -> set[str]:
    """What systemd-nspawn (without a host systemd) creates below its own cgroup in
    every hierarchy: payload/ (the box) and supervisor/ (nspawn), with descendants."""
    own = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for ctrl in parts[1].split(",") if parts[1] else ["unified"]:
                own[ctrl.removeprefix("name=")] = parts[2]
    out: set[str] = set()
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        base = own.get(hierarchy.name, own.get("unified", "/"))
        for name in ("payload", "supervisor"):
            top = hierarchy / base.lstrip("/") / name
            if top.is_dir() and not top.is_symlink():
                out.add(str(top))
                for root, dirs, _ in os.walk(top):
                    out.update(os.path.join(root, d) for d in dirs)
    return out


def remove_nspawn_cgroups(timeout: float = 5.0) -> list[str]:
    """rmdir (never rm -r: only empty cgroups go) nspawn's payload/ and supervisor/ trees,
    children first; returns what stayed. Nothing else is touched: other processes on
    this machine (tests of the daemon's own cgroup code) create cgroups concurrently."""
    deadline = time.monotonic() + timeout
    while True:
        # a just-emptied cgroup may stay busy for a moment
        for d in sorted(_nspawn_cgroup_dirs(), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        left = sorted(_nspawn_cgroup_dirs())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


# --- the box ---------------------------------------------------------------------------------


class Box:
    """One booted container. Use as a context manager: it always stops and cleans up."""

    def __init__(self, binds_ro: dict[Path, str] | None = None, name: str = "aitbc-box") -> None:
        self.binds_ro = binds_ro or {}
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.console = CACHE / "console.log"
        self.pidfile = CACHE / "nspawn.pid"
        self._leader: int | None = None

    def __enter__(self) -> Box:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # lifecycle

    def start(self, timeout: float = 60) -> None:
        stop_stale(self.pidfile)
        args = [
            "systemd-nspawn",
            "-D",
            str(ROOTFS),
            "--boot",
            # no D-Bus to a host systemd/machined: there is none
            "--register=no",
            "--keep-unit",
            "--console=passive",
            "--private-network",
            "--volatile=overlay",
            f"--machine={self.name}",
            # nspawn's own seccomp allow-list (systemd 252) predates Landlock: without
            # this, every process in the box gets EPERM for it, whatever the unit says.
            "--system-call-filter=landlock_create_ruleset landlock_add_rule landlock_restrict_self",
        ]
        args += [f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro.items()]
        t0 = time.monotonic()
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.pidfile.write_text(str(self.proc.pid))
        state = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise BoxError(f"systemd-nspawn exited {code}: {self.console_tail()}")
            if self.leader() is not None:
                r = self.exec("systemctl", "is-system-running", check=False, timeout=10)
                state = r.stdout.strip()
                if state in ("running", "degraded"):
                    log(f"booted to {state!r} in {time.monotonic() - t0:.1f}s")
                    return
            time.sleep(0.2)
        self.stop()
        raise BoxError(f"boot did not finish (state {state!r}): {self.console_tail()}")

    def leader(self) -> int | None:
        """Host PID of the box's PID 1 (systemd), a child of systemd-nspawn."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        if self._leader is not None and _comm(self._leader) == "systemd":
            return self._leader
        self._leader = _child_named(self.proc.pid, "systemd")
        return self._leader

    def stop(self, timeout: float = 30) -> None:
        if self.proc is not None and self.proc.poll() is None:
            leader = self.leader()
            self.proc.send_signal(signal.SIGTERM)  # nspawn: clean poweroff of the box
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log("box did not halt; SIGKILL its PID 1, then nspawn")
                if leader is not None:  # killing only nspawn would leave the box running
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(leader, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait(10)
        self.pidfile.unlink(missing_ok=True)
        left = remove_nspawn_cgroups()
        if left:
            log(f"could not remove cgroups: {left[:5]}")
        self._leader = None

    def console_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no console log)"

    # driving it

    def exec(
        self,
        *cmd: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        leader = self.leader()
        if leader is None:
            raise BoxError("box is not running")
        envs = [f"{k}={v}" for k, v in (env or {}).items()]
        argv = ["nsenter", "-t", str(leader), "-a", "--", "env", "-i", f"PATH={BOX_PATH}"]
        argv += ["TERM=dumb", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "LANG=C.UTF-8", *envs, *cmd]
        r = subprocess.run(argv, input=input, text=True, capture_output=True, timeout=timeout)
        if check and r.returncode != 0:
            raise BoxError(
                f"in box: {' '.join(cmd)[:200]} -> {r.returncode}\n"
                f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"
            )
        return r

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.exec("/bin/sh", "-c", script, **kw)  # type: ignore[arg-type]

    def write(self, path: str, content: str, mode: str = "0644") -> None:
        self.exec(
            "/bin/sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
            "sh", path, mode, input=content,
        )  # fmt: skip

    def show(self, unit: str, *props: str) -> dict[str, str]:
        r = self.exec("systemctl", "show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def journal(self, *args: str) -> list[dict[str, object]]:
        r = self.exec("journalctl", "--no-pager", "-o", "json", *args, check=False)
        out = []
        for line in r.stdout.splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def http(
        self, method: str, url: str, body: object = None, timeout: float = 10
    ) -> tuple[int, bytes]:
        """One HTTP request from inside the box (its loopback is not the host's)."""
        r = self.exec(
            "/usr/bin/python3", "-c", _HTTP_SCRIPT, method, url, str(timeout),
            input=json.dumps(body) if body is not None else "", timeout=timeout + 10,
        )  # fmt: skip
        reply = json.loads(r.stdout)
        if reply.get("error"):
            raise BoxError(f"{method} {url}: {reply['error']}")
        return reply["status"], bytes.fromhex(reply["body"])

    def http_json(self, method: str, url: str, body: object = None) -> object:
        status, raw = self.http(method, url, body)
        if status >= 300:
            raise BoxError(f"{method} {url} -> {status}: {raw[:500]!r}")
        return json.loads(raw)


_HTTP_SCRIPT = r"""
import json, sys, urllib.request, urllib.error
method, url, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
data = sys.stdin.read().encode() or None
req = urllib.request.Request(url, data=data, method=method)
if data:
    req.add_header("content-type", "application/json")
try:
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        status, body = resp.status, resp.read()
except urllib.error.HTTPError as exc:
    status, body = exc.code, exc.read()
except Exception as exc:
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"})); sys.exit(0)
print(json.dumps({"status": status, "body": body.hex()}))
"""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _child_named(parent: int, name: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(parent) and _comm(int(entry.name)) == name:
            return int(entry.name)
    return None


def stop_stale(pidfile: Path) -> None:
    """A box left running by a killed test run: stop it before booting a new one."""
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return
    if _comm(pid) != "systemd-nspawn":
        pidfile.unlink(missing_ok=True)
        remove_nspawn_cgroups(timeout=1)
        return
    log(f"stopping a stale box (nspawn pid {pid})")
    leader = _child_named(pid, "systemd")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while _comm(pid) == "systemd-nspawn" and time.monotonic() < deadline:
        time.sleep(0.2)
    if _comm(pid) == "systemd-nspawn":
        if leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(leader, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    remove_nspawn_cgroups()


# --- by hand -------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in ("build", "start", "exec", "stop"):
        print(__doc__)
        return 2
    reason = unavailable_reason()
    if reason:
        print(f"cannot boot a box here: {reason}", file=sys.stderr)
        return 1
    if argv[0] == "build":
        with cache_lock():
            prepare()
        return 0
    if argv[0] == "stop":
        stop_stale(CACHE / "nspawn.pid")
        return 0
    if argv[0] == "start":
        with cache_lock():
            prepare()
        box = Box({REPO: "/opt/aitbc/src", WHEELS: "/opt/aitbc/wheels"})
        box.start()
        print(f"box up: nspawn pid {box.proc.pid if box.proc else '?'}, leader {box.leader()}")
        print("  python -m tests.system.box exec CMD...   |   python -m tests.system.box stop")
        box.proc = None  # keep it running after we exit
        return 0
    pid = int((CACHE / "nspawn.pid").read_text())
    leader = _child_named(pid, "systemd")
    if leader is None:
        print("box not running", file=sys.stderr)
        return 1
    return subprocess.call(["nsenter", "-t", str(leader), "-a", "--", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
