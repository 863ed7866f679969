"""Sandbox pieces in isolation: limit computation (pure), the cgroup backend over a
directory that imitates cgroupfs (named as such), and the real fork server."""

from __future__ import annotations

import os
import resource
import socket
from pathlib import Path

import pytest
import trio

from aitbc_miner.runners.base import Ending, Spawn, run_process
from aitbc_miner.sandbox.cgroups import (
    CgroupSupport,
    CgroupUnavailable,
    JobCgroup,
    detect,
    limit_files,
)
from aitbc_miner.sandbox.limits import LimitPolicy, landlock_rules, process_limits, tcp_fallback
from aitbc_miner.sandbox.spawner import ForkServer, ForkServerError

MIB = 1024 * 1024


# -- pure ---------------------------------------------------------------------------------


def test_limit_files_for_every_controller():
    files = limit_files(512, 3, 100)
    assert files["v2"] == {
        "memory.max": str(512 * MIB),
        "memory.swap.max": "0",
        "cpu.max": "300000 100000",
        "pids.max": "100",
    }
    assert files["memory"]["memory.limit_in_bytes"] == str(512 * MIB)
    assert files["pids"] == {"pids.max": "100"}
    assert limit_files(None, None, None) == {"v2": {}, "memory": {}, "pids": {}}


def test_process_limits_use_rlimit_data_only_without_a_memory_cgroup():
    policy = LimitPolicy(
        cpu_nice=7, io_class="idle", io_level=0, max_open_files=99, max_processes=55
    )
    with_cg = process_limits(
        policy,
        mem_mb=64,
        max_output_mb=10,
        memory_cgroup=True,
        network=False,
        cgroup_procs=["/x/cgroup.procs"],
    )
    assert "DATA" not in with_cg["rlimits"]
    assert with_cg["rlimits"]["NOFILE"] == (99, 99) and with_cg["rlimits"]["NPROC"] == (55, 55)
    assert with_cg["rlimits"]["FSIZE"] == (10 * MIB, 10 * MIB) and with_cg["rlimits"]["CORE"] == (
        0,
        0,
    )
    assert with_cg["nice"] == 7 and with_cg["ioprio"] == ["idle", 0]
    assert with_cg["netns"] is True and with_cg["cgroup_procs"] == ["/x/cgroup.procs"]
    without = process_limits(
        policy, mem_mb=64, max_output_mb=10, memory_cgroup=False, network=True, cgroup_procs=[]
    )
    assert without["rlimits"]["DATA"] == (64 * MIB, 64 * MIB) and without["netns"] is False


def test_landlock_rules_expose_only_the_jobs_own_dirs():
    rules = landlock_rules("/ws/j1", ["/opt/tool/bin"])
    assert "/ws/j1/work" in rules["write"] and "/ws/j1/output" in rules["write"]
    assert "/ws/j1/input" in rules["read"] and "/opt/tool/bin" in rules["read"]
    assert not any(
        p in ("/ws", "/ws/j1", "/tmp", "/root", "/home") for p in rules["read"] + rules["write"]
    )


@pytest.mark.parametrize(
    ("network", "netns", "abi", "deny"),
    [
        (False, False, 4, True),  # the only case: no namespace here, Landlock can do TCP
        (False, False, 3, False),  # Landlock too old: nothing to do (reported NOT ISOLATED)
        (False, True, 7, False),  # a private netns already isolates, loopback included
        (True, False, 7, False),  # the job may use the network
    ],
)
def test_tcp_is_denied_by_landlock_only_where_no_netns_can_isolate(network, netns, abi, deny):
    assert tcp_fallback(network=network, netns=netns, landlock_abi=abi) is deny
    assert ("deny_tcp" in landlock_rules("/ws/j", [], deny_tcp=deny)) is deny


# -- cgroup backend over an imitation of cgroupfs ---------------------------------------------


def fake_cgroupfs(tmp_path: Path) -> tuple[Path, CgroupSupport]:
    """A directory that imitates a delegated cgroup2 subtree (NOT a real cgroupfs)."""
    base = tmp_path / "fake-cgroupfs" / "aitbc-miner.jobs"
    base.mkdir(parents=True)
    return base, CgroupSupport(v2_base=base, v2_controllers=frozenset({"memory", "cpu", "pids"}))


def test_job_cgroup_writes_limits_into_the_controller_files(tmp_path, monkeypatch):
    base, support = fake_cgroupfs(tmp_path)
    real_mkdir = Path.mkdir

    def mkdir_with_files(self: Path, *args, **kwargs):  # the kernel creates these files
        real_mkdir(self, *args, **kwargs)
        if self.parent == base:
            for name in (
                "memory.max",
                "memory.swap.max",
                "cpu.max",
                "pids.max",
                "cgroup.procs",
                "memory.events",
                "cgroup.kill",
                "memory.peak",
            ):
                (self / name).write_text("")

    monkeypatch.setattr(Path, "mkdir", mkdir_with_files)
    group = JobCgroup.create(support, "j1", 2, limit_files(256, 2, 64))
    assert group.v2 is not None and group.v2.parent == base and group.v2.name.startswith("j1.a2.")
    assert (group.v2 / "memory.max").read_text() == str(256 * MIB)
    assert (group.v2 / "memory.swap.max").read_text() == "0"
    assert (group.v2 / "cpu.max").read_text() == "200000 100000"
    assert (group.v2 / "pids.max").read_text() == "64"
    assert group.procs_files == [str(group.v2 / "cgroup.procs")]
    assert group.limits_memory
    (group.v2 / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 0\n")
    assert not group.oom_killed()
    (group.v2 / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    assert group.oom_killed()
    (group.v2 / "memory.peak").write_text(str(300 * MIB))
    assert group.peak_memory_mb() == 300
    assert JobCgroup.from_recorded(group.primary, support).v2 == group.v2


def test_v1_memory_oom_is_read_from_oom_control(tmp_path):
    mem = tmp_path / "fake-cgroup-v1-memory" / "j.a1"
    mem.mkdir(parents=True)
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert JobCgroup(v1={"memory": mem}).oom_killed()
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert not JobCgroup(v1={"memory": mem}).oom_killed()


def test_detect_off_and_required(tmp_path):
    assert not detect("off").active
    proc = tmp_path / "fake-proc-self"
    proc.mkdir()
    (proc / "mountinfo").write_text("")
    (proc / "cgroup").write_text("0::/\n")
    assert not detect("auto", proc=proc).active
    with pytest.raises(CgroupUnavailable, match="required"):
        detect("required", proc=proc)


# -- the real fork server -------------------------------------------------------------------


async def run_with(server: ForkServer, tmp_path: Path, script: str, limits: dict):
    log = tmp_path / "exec.log"
    result = await run_process(
        Spawn(
            ["/bin/sh", "-c", script], tmp_path, {"PATH": "/usr/bin:/bin"}, log, 10, limits=limits
        ),
        cancel=trio.Event(),
        spawner=server,
    )
    return result, log.read_text()


async def test_forkserver_applies_limits_between_fork_and_exec(forkserver, tmp_path):
    limits = process_limits(
        LimitPolicy(cpu_nice=13, max_open_files=77),
        mem_mb=128,
        max_output_mb=3,
        memory_cgroup=False,
        network=True,
        cgroup_procs=[],
    )
    script = (
        "ulimit -n; ulimit -f; ulimit -c; ulimit -d; nice; umask; "
        "grep NoNewPrivs /proc/self/status; ps -o sid=,pgid=,pid= -p $$ 2>/dev/null || true"
    )
    result, out = await run_with(forkserver, tmp_path, script, limits)
    assert result.ending is Ending.EXITED and result.exit_code == 0, out
    lines = out.split("\n")
    assert lines[0] == "77"
    assert lines[1] == str(3 * MIB // 512)  # dash counts ulimit -f in 512-byte blocks
    assert lines[2] == "0" and lines[3] == str(128 * 1024)
    assert lines[4] == str(max(13, os.getpriority(os.PRIO_PROCESS, 0)))
    assert lines[5] == "0077"
    assert "NoNewPrivs:\t1" in out


async def test_forkserver_restores_default_signals(forkserver, tmp_path):
    result, _ = await run_with(
        forkserver,
        tmp_path,
        "exec head -c 10M /dev/zero > big.bin",
        {"rlimits": {"FSIZE": (1 * MIB, 1 * MIB)}},
    )
    assert result.signal == 25  # SIGXFSZ kills at the cap, as it would outside Python
    result, out = await run_with(forkserver, tmp_path, "yes | head -1; echo rc=$?", {})
    assert "rc=0" in out


async def test_forkserver_private_network_has_only_loopback(forkserver, tmp_path):
    if forkserver.netns != "ok":
        pytest.skip(f"this host cannot create network namespaces ({forkserver.netns})")
    _, out = await run_with(forkserver, tmp_path, "cat /proc/net/dev", {"netns": True})
    interfaces = [line.split(":")[0].strip() for line in out.splitlines()[2:] if ":" in line]
    assert interfaces == ["lo"], out


async def test_forkserver_landlock_confines_the_filesystem(forkserver, tmp_path):
    if forkserver.landlock_abi == 0:
        pytest.skip("this kernel has no Landlock")
    job = tmp_path / "job"
    (job / "work").mkdir(parents=True)
    (job / "output").mkdir()
    (job / "input").mkdir()
    secret = tmp_path / "other-job-secret.txt"
    secret.write_text("s3cret")
    rules = landlock_rules(str(job), [])
    log = tmp_path / "exec.log"
    result = await run_process(
        Spawn(
            [
                "/bin/sh",
                "-c",
                f"cat {secret}; echo rc1=$?; echo x > ../outside; echo rc2=$?; "
                "echo ok > inside; echo rc3=$?",
            ],
            job / "work",
            {"PATH": "/usr/bin:/bin"},
            log,
            10,
            limits={"landlock": rules},
        ),
        cancel=trio.Event(),
        spawner=forkserver,
    )
    out = log.read_text()
    assert result.exit_code == 0
    assert "s3cret" not in out and "rc1=1" in out and "rc2=0" not in out and "rc3=0" in out
    assert not (job / "outside").exists() and (job / "work" / "inside").exists()


async def test_forkserver_landlock_denies_tcp_when_asked(forkserver, tmp_path):
    if forkserver.landlock_abi < 4:
        pytest.skip(f"Landlock ABI {forkserver.landlock_abi} cannot restrict TCP")
    job = tmp_path / "job"
    for sub in ("work", "output", "input"):
        (job / sub).mkdir(parents=True)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    script = (
        "import socket\ntry:\n"
        f"    socket.create_connection(('127.0.0.1', {port}), timeout=3); print('CONNECTED')\n"
        "except OSError as exc:\n    print('REFUSED', type(exc).__name__)\n"
    )
    outputs = {}
    try:
        for deny in (True, False):
            log = tmp_path / f"exec-{deny}.log"
            await run_process(
                Spawn(
                    ["/usr/bin/python3", "-c", script],
                    job / "work",
                    {"PATH": "/usr/bin:/bin"},
                    log,
                    10,
                    limits={"landlock": landlock_rules(str(job), [], deny_tcp=deny)},
                ),
                cancel=trio.Event(),
                spawner=forkserver,
            )
            outputs[deny] = log.read_text()
    finally:
        listener.close()
    assert "REFUSED PermissionError" in outputs[True], outputs
    assert "CONNECTED" in outputs[False], outputs  # the same job, TCP allowed


async def test_forkserver_reports_exec_failure(forkserver, tmp_path):
    with pytest.raises(ForkServerError) as info:
        await forkserver.start(
            ["/nonexistent/tool"], {}, str(tmp_path), os.open(os.devnull, os.O_WRONLY), {}
        )
    assert "No such file" in str(info.value)


async def test_forkserver_leaves_the_daemon_limits_alone(forkserver, tmp_path):
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    await run_with(forkserver, tmp_path, "true", {"rlimits": {"NOFILE": (20, 20)}})
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


def test_detect_reads_favordynmods_from_mountinfo(tmp_path):
    proc = tmp_path / "fake-proc-self"
    proc.mkdir()
    line = "30 25 0:26 / {mnt} rw,nosuid - cgroup2 cgroup2 rw,{opts}\n"
    (proc / "cgroup").write_text("0::/nonexistent-group\n")
    (proc / "mountinfo").write_text(
        line.format(mnt=tmp_path / "no-such-mount", opts="favordynmods")
    )
    assert detect("auto", proc=proc).favordynmods
    (proc / "mountinfo").write_text(line.format(mnt=tmp_path / "no-such-mount", opts="nsdelegate"))
    assert not detect("auto", proc=proc).favordynmods
