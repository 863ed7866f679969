"""Pure computation of a job's process limits (what the fork server applies).

No I/O. The result is the `limits` object of a fork-server spawn request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 1024 * 1024


@dataclass(frozen=True)
class LimitPolicy:
    """Node-wide settings (from `resources`)."""

    cpu_nice: int = 10
    io_class: str = "best-effort"
    io_level: int = 6
    max_open_files: int = 4096
    max_processes: int = 1024


def process_limits(
    policy: LimitPolicy,
    *,
    mem_mb: int,
    max_output_mb: int,
    memory_cgroup: bool,
    network: bool,
    cgroup_procs: list[str],
) -> dict[str, Any]:
    """Limits for one job.

    Memory: with a memory cgroup the kernel's OOM killer enforces `mem_mb` and
    the kill is reported as E_OOM; without one RLIMIT_DATA caps the heap
    (allocations then fail inside the job instead). RLIMIT_AS is not used: it
    counts reservations, not memory, and breaks runtimes that reserve big
    address ranges (JVMs, CUDA, Go).
    """
    rlimits: dict[str, tuple[int, int]] = {
        "NOFILE": (policy.max_open_files, policy.max_open_files),
        "NPROC": (policy.max_processes, policy.max_processes),
        "FSIZE": (max_output_mb * MIB, max_output_mb * MIB),
        "CORE": (0, 0),
    }
    if not memory_cgroup:
        rlimits["DATA"] = (mem_mb * MIB, mem_mb * MIB)
    return {
        "rlimits": rlimits,
        "nice": policy.cpu_nice,
        "ioprio": [policy.io_class, policy.io_level],
        "netns": not network,
        "cgroup_procs": list(cgroup_procs),
    }


# What every job may read (and execute) outside its workspace: the system.
SYSTEM_READ = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
    "/opt",
    "/proc",
    "/sys",
    "/run/systemd/resolve",
)
# Device nodes stay guarded by their permissions and the devices cgroup.
SYSTEM_WRITE = ("/dev",)


def landlock_rules(
    job_dir: str, extra_read: list[str], *, deny_tcp: bool = False
) -> dict[str, Any]:
    """The filesystem view of a job: its own work/ and output/ writable, its
    input/ and task spec readable, the system read-only; nothing else (other
    jobs, the daemon's state and logs, home directories, /tmp). `deny_tcp`:
    no TCP bind or connect at all (see `tcp_fallback`)."""
    rules: dict[str, Any] = {
        "read": [*SYSTEM_READ, f"{job_dir}/input", f"{job_dir}/task.json", *extra_read],
        "write": [f"{job_dir}/work", f"{job_dir}/output", *SYSTEM_WRITE],
    }
    if deny_tcp:
        rules["deny_tcp"] = True
    return rules


def tcp_fallback(*, network: bool, netns: bool, landlock_abi: int) -> bool:
    """Whether a job's TCP must be denied by Landlock: it may not use the network,
    this host cannot give it a private network namespace, and Landlock (ABI >= 4)
    can restrict TCP. (UDP and other protocols stay open: only a netns closes them;
    a netns keeps loopback, which Landlock cannot tell apart.)"""
    return not network and not netns and landlock_abi >= 4
