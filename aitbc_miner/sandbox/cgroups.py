"""Per-job cgroups: cgroup v2 where the daemon owns a writable subtree, the v1
memory and pids controllers as a fallback where cgroup2 lacks them.

I/O: the cgroup filesystems (and /proc, to see whether a group's owner still
runs). `detect()` runs once at start and says what
this host can enforce; `JobCgroup` creates one job's groups, which the job's
own process joins between fork and exec (fork server), so no code of the job
runs outside them. OOM kills are told apart from other deaths by
`memory.events` (v2) or `memory.oom_control` (v1). `kill()` reaches every
process of the job, even ones that escaped its process group (setsid, double
fork). The pure limit computation is `limit_files()`. Every group's name ends
in its daemon's `owner_tag()`; `remove_stale()` removes, at start, the empty
groups of daemons that are gone.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import structlog

log = structlog.get_logger(__name__)

BASE_NAME = "aitbc-miner.jobs"
# Every group a daemon makes ends in ".<its pid>-<token>", so the next daemon can tell
# the leftovers of a dead one (a crash between making a group and recording it) from
# the groups of another live daemon sharing the hierarchy. See `remove_stale`.
_TOKEN = secrets.token_hex(3)
LIVE_TOKENS: set[str] = {_TOKEN}  # tokens in use by this process (its pools add theirs)
_OWNER_RE = re.compile(r"(\d+)-([0-9a-f]{6})")
WANTED = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000


class CgroupUnavailable(Exception):
    """`resources.cgroup: required` but this host cannot provide per-job cgroups."""


@dataclass(frozen=True)
class CgroupSupport:
    """What per-job cgroups can do on this host."""

    v2_base: Path | None = None
    v2_controllers: frozenset[str] = frozenset()
    v1_bases: dict[str, Path] = field(default_factory=dict)  # controller -> base dir
    reason: str = ""
    # Moving a task into a cgroup waits for an RCU grace period (10-20 ms on an
    # idle host) unless cgroup2 is mounted with favordynmods (kernel >= 6.0).
    favordynmods: bool = False

    def enforced(self) -> dict[str, str]:
        """One line per resource for the start-up log and /healthz."""

        def via(ctrl: str, fallback: str) -> str:
            if self.v2_base is not None and ctrl in self.v2_controllers:
                return "cgroup2"
            if ctrl in self.v1_bases:
                return "cgroup1"
            return fallback

        return {
            "tracking": "cgroup2 (cgroup.kill)" if self.v2_base is not None else "process group",
            "memory": via("memory", "rlimit (RLIMIT_DATA)"),
            "cpu": via("cpu", "nice only"),
            "pids": via("pids", "rlimit (RLIMIT_NPROC)"),
        }

    @property
    def active(self) -> bool:
        return self.v2_base is not None or bool(self.v1_bases)


def _mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """(mount point, fstype, super options) of cgroup mounts."""
    out = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields_, rfields = left.split(), right.split()
        if len(fields_) < 5 or len(rfields) < 3 or not rfields[0].startswith("cgroup"):
            continue
        out.append((fields_[4], rfields[0], set(rfields[2].split(","))))
    return out


def _own_paths(proc_cgroup: str) -> dict[str, str]:
    """controller (or "" for v2) -> path, from /proc/self/cgroup."""
    own = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for ctrl in parts[1].split(",") if parts[1] else [""]:
            own[ctrl] = parts[2]
    return own


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def detect(mode: str, *, proc: Path = Path("/proc/self"), pid: int | None = None) -> CgroupSupport:
    """Find the cgroups this daemon may use; `mode` is resources.cgroup (auto|off|required)."""
    if mode == "off":
        return CgroupSupport(reason="resources.cgroup is off")
    mounts = _mounts(_read(proc / "mountinfo"))
    own = _own_paths(_read(proc / "cgroup"))
    support = CgroupSupport(reason="no writable cgroup found")
    v2_mount = next((m for m, fs, _ in mounts if fs == "cgroup2"), None)
    favor = any(fs == "cgroup2" and "favordynmods" in opts for _, fs, opts in mounts)
    if v2_mount is not None and "" in own:
        v2 = _setup_v2(Path(v2_mount), own[""], pid or os.getpid())
        if v2 is not None:
            support = CgroupSupport(v2_base=v2[0], v2_controllers=v2[1])
    v1 = {}
    for ctrl in ("memory", "pids"):
        if ctrl in support.v2_controllers:
            continue
        mount = next((m for m, fs, opts in mounts if fs == "cgroup" and ctrl in opts), None)
        if mount is None or ctrl not in own:
            continue
        base = Path(mount) / own[ctrl].lstrip("/") / BASE_NAME
        try:
            base.mkdir(exist_ok=True)
        except OSError:
            continue
        if _writable_dir(base):
            v1[ctrl] = base
    support = CgroupSupport(support.v2_base, support.v2_controllers, v1, support.reason, favor)
    memory_ok = "memory" in support.v2_controllers or "memory" in support.v1_bases
    if mode == "required" and (support.v2_base is None or not memory_ok):
        raise CgroupUnavailable(
            "resources.cgroup is 'required' but this host gives the daemon "
            + ("no writable cgroup2 subtree" if support.v2_base is None else "no memory controller")
            + " (under systemd: Delegate=yes)"
        )
    return support


def _setup_v2(mount: Path, rel: str, pid: int) -> tuple[Path, frozenset[str]] | None:
    own = mount / rel.lstrip("/")
    if not _writable_dir(own) or not (own / "cgroup.procs").exists():
        return None
    try:
        if own != mount:
            # A delegated service cgroup (systemd Delegate=yes) holds the daemon
            # itself; cgroup2 forbids processes in a group that hands controllers
            # to children, so the daemon moves into a leaf of its own first.
            leaf = own / "daemon"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(str(pid))
        available = set(_read(own / "cgroup.controllers").split())
        wanted = [c for c in WANTED if c in available]
        if wanted:
            (own / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
        base = own / BASE_NAME
        base.mkdir(exist_ok=True)
        if wanted:
            (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
        enabled = frozenset(_read(base / "cgroup.subtree_control").split())
    except OSError as exc:
        log.warning("cgroup2_unusable", cgroup=str(own), error=str(exc))
        return None
    return base, enabled


def limit_files(
    mem_mb: int | None, cpu_threads: int | None, pids_max: int | None
) -> dict[str, dict[str, str]]:
    """Pure: the files to write per controller flavour, from a job's requirements."""
    v2: dict[str, str] = {}
    v1_memory: dict[str, str] = {}
    v1_pids: dict[str, str] = {}
    if mem_mb:
        v2["memory.max"] = str(mem_mb * 1024 * 1024)
        v2["memory.swap.max"] = "0"
        v1_memory["memory.limit_in_bytes"] = str(mem_mb * 1024 * 1024)
        v1_memory["memory.memsw.limit_in_bytes"] = str(mem_mb * 1024 * 1024)
    if cpu_threads:
        v2["cpu.max"] = f"{cpu_threads * CPU_PERIOD_US} {CPU_PERIOD_US}"
    if pids_max:
        v2["pids.max"] = str(pids_max)
        v1_pids["pids.max"] = str(pids_max)
    return {"v2": v2, "memory": v1_memory, "pids": v1_pids}


@dataclass
class JobCgroup:
    """The cgroups of one job: a v2 group and/or v1 memory/pids groups."""

    v2: Path | None = None
    v1: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(
        cls, support: CgroupSupport, job_id: str, attempt: int, files: dict[str, dict[str, str]]
    ) -> JobCgroup:
        group = cls.make(support, f"{job_id}.a{attempt}.{uuid.uuid4().hex[:6]}.{owner_tag()}")
        try:
            group.apply(files)
        except OSError:
            group.remove()
            raise
        return group

    @classmethod
    def make(cls, support: CgroupSupport, name: str) -> JobCgroup:
        """Empty groups named `name` in every hierarchy the daemon may use (no limits yet)."""
        group = cls()
        try:
            if support.v2_base is not None:
                group.v2 = support.v2_base / name
                group.v2.mkdir()
            for ctrl, base in support.v1_bases.items():
                path = base / name
                path.mkdir()
                group.v1[ctrl] = path
        except OSError:
            group.remove()
            raise
        return group

    def apply(self, files: dict[str, dict[str, str]]) -> None:
        """Write a job's limits (from `limit_files`); processes may already be inside."""
        if self.v2 is not None:
            _write_limits(self.v2, files["v2"])
        for ctrl, path in self.v1.items():
            _write_limits(path, files.get(ctrl, {}))

    @property
    def limits_memory(self) -> bool:
        """Whether a memory controller enforces the job's memory limit."""
        if self.v2 is not None and (self.v2 / "memory.max").exists():
            return True
        return "memory" in self.v1

    @property
    def procs_files(self) -> list[str]:
        """cgroup.procs files the job's first process writes its pid into before exec."""
        paths = [self.v2] if self.v2 is not None else []
        paths += list(self.v1.values())
        return [str(p / "cgroup.procs") for p in paths]

    @property
    def primary(self) -> str | None:
        """The path recorded in state.json for recovery."""
        path = self.v2 or next(iter(self.v1.values()), None)
        return str(path) if path is not None else None

    def oom_killed(self) -> bool:
        if self.v2 is not None and (self.v2 / "memory.events").exists():
            return _counter(self.v2 / "memory.events", "oom_kill") > 0
        if "memory" in self.v1:
            return _counter(self.v1["memory"] / "memory.oom_control", "oom_kill") > 0
        return False

    def peak_memory_mb(self) -> int | None:
        for path in (
            (self.v2 / "memory.peak") if self.v2 else None,
            (self.v1["memory"] / "memory.max_usage_in_bytes") if "memory" in self.v1 else None,
        ):
            if path is not None and path.exists():
                try:
                    return int(path.read_text().split()[0]) // (1024 * 1024)
                except (OSError, ValueError, IndexError):
                    continue
        return None

    def pids(self) -> set[int]:
        found: set[int] = set()
        for path in ([self.v2] if self.v2 else []) + list(self.v1.values()):
            for line in _read(path / "cgroup.procs").split():
                if line.isdigit():
                    found.add(int(line))
        return found

    def kill(self, timeout: float = 5.0) -> int:
        """Kill every process in the job's groups; returns how many were seen."""
        seen = self.pids()
        if self.v2 is not None and (self.v2 / "cgroup.kill").exists():
            try:
                (self.v2 / "cgroup.kill").write_text("1")
            except OSError as exc:
                log.warning("cgroup_kill_failed", cgroup=str(self.v2), error=str(exc))
        deadline = time.monotonic() + timeout
        while True:
            alive = self.pids()
            if not alive:
                return len(seen)
            for pid in alive:  # v1 (or no cgroup.kill): signal each member, racing forks
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            seen |= alive
            if time.monotonic() > deadline:
                log.error("cgroup_not_empty", pids=sorted(alive)[:20])
                return len(seen)
            time.sleep(0.005)

    def remove(self) -> None:
        for path in ([self.v2] if self.v2 else []) + list(self.v1.values()):
            try:
                path.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cgroup_remove_failed", cgroup=str(path), error=str(exc))

    @classmethod
    def from_recorded(cls, primary: str, support: CgroupSupport) -> JobCgroup:
        """Rebuild the groups of a job from the path recorded in state.json (recovery)."""
        path = Path(primary)
        group = cls()
        if support.v2_base is not None and path.parent == support.v2_base:
            group.v2 = path
        for ctrl, base in support.v1_bases.items():
            if (base / path.name).is_dir():
                group.v1[ctrl] = base / path.name
        return group


def _write_limits(path: Path, files: dict[str, str]) -> None:
    for name, value in files.items():
        target = path / name
        if target.exists():  # a controller that is not enabled has no file: skip it
            target.write_text(value)


def _counter(path: Path, key: str) -> int:
    for line in _read(path).splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return 0


def owner_tag(token: str = _TOKEN) -> str:
    """The suffix that marks a group as this process's."""
    return f"{os.getpid()}-{token}"


def remove_stale(support: CgroupSupport) -> int:
    """Remove the empty groups of daemons that are gone; returns how many.

    Gone: its pid is not running, or it is our own pid (a restart in a fresh pid
    namespace often gets the same one) with a token this process does not use.
    A group that still holds processes is kept: recovery kills a recorded job's.
    """
    removed = 0
    bases = ([support.v2_base] if support.v2_base else []) + list(support.v1_bases.values())
    for base in bases:
        try:
            names = [e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for name in names:
            if not _stale(name):
                continue
            try:
                (base / name).rmdir()
                removed += 1
            except OSError as exc:
                log.debug("cgroup_stale_kept", cgroup=str(base / name), error=str(exc))
    if removed:
        log.info("cgroup_stale_removed", groups=removed)
    return removed


def _stale(name: str) -> bool:
    owner = _OWNER_RE.fullmatch(name.rsplit(".", 1)[-1])
    if owner is None:
        return False  # not a name of ours: not ours to judge
    pid, token = int(owner.group(1)), owner.group(2)
    if pid == os.getpid():
        return token not in LIVE_TOKENS
    return not psutil.pid_exists(pid)
