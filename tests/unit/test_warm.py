"""Warm starts: fork-server stems that join a spare cgroup (and a private netns) ahead of the job.

Real fork server, real cgroups where this host lets the test user write them.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import trio

from aitbc_miner.runners.base import Spawn, run_process
from aitbc_miner.sandbox.cgroups import (
    CgroupSupport,
    JobCgroup,
    detect,
    limit_files,
    owner_tag,
    remove_stale,
)
from aitbc_miner.sandbox.spawner import ForkServer, ForkServerError
from aitbc_miner.sandbox.warm import PREFIX, WarmPool
from tests.support.wait import await_for

SCRIPT = "echo pid=$$; cat /proc/self/cgroup; cat /proc/net/dev; ls -l /proc/self/fd"


@pytest.fixture
def support() -> CgroupSupport:
    found = detect("auto")
    if not found.active:
        pytest.skip(f"no writable cgroup on this host ({found.reason})")
    return found


@pytest.fixture
def server(forkserver: ForkServer) -> ForkServer:
    return forkserver


@pytest.fixture
async def pool(support, server, nursery):
    warm = WarmPool(support, server, netns=server.netns == "ok")
    await nursery.start(warm.run)
    assert warm.ready == 1, "the first spare is ready when run() reports started"
    yield warm
    await warm.aclose()


def proc_cgroups(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text()


def stem_joined(pid: int, name: str, hierarchies: int) -> bool:
    try:
        return proc_cgroups(pid).count(f"/{name}\n") == hierarchies
    except FileNotFoundError:
        return False


def hierarchies(support: CgroupSupport) -> int:
    return (1 if support.v2_base else 0) + len(support.v1_bases)


async def run(server: ForkServer, tmp_path: Path, limits: dict, script: str = SCRIPT):
    log = tmp_path / "exec.log"
    log.unlink(missing_ok=True)
    spawn = Spawn(["/bin/sh", "-c", script], tmp_path, {"PATH": "/usr/bin:/bin"}, log, 10)
    result = await run_process(
        Spawn(**{**spawn.__dict__, "limits": limits}), cancel=trio.Event(), spawner=server
    )
    return result, log.read_text()


def interfaces(out: str) -> list[str]:
    return re.findall(r"^\s*([\w.@-]+):\s+\d", out, re.MULTILINE)


def job_limits(warm) -> dict:
    return {"cgroup_procs": warm.cgroup.procs_files, "netns": warm.netns, "stem": warm.ref}


async def test_the_stem_is_in_its_groups_before_the_job_exists_and_becomes_the_job(
    pool, support, server, tmp_path
):
    warm = await pool.take(limit_files(256, None, 64), netns=server.netns == "ok")
    assert warm is not None
    name = warm.cgroup.v2.name if warm.cgroup.v2 else next(iter(warm.cgroup.v1.values())).name
    assert name.startswith(PREFIX) and name.endswith(f".{os.getpid()}-{pool._token}")
    await await_for(
        lambda: stem_joined(warm.stem, name, hierarchies(support)), timeout=5, what="stem joined"
    )

    result, out = await run(server, tmp_path, job_limits(warm))

    assert result.exit_code == 0, out
    assert f"pid={warm.stem}" in out  # no new fork on the start path: the stem exec'd the job
    assert out.count(f"/{name}\n") == hierarchies(support), out
    if warm.netns:
        assert interfaces(out) == ["lo"], out
    # Only stdin, stdout, stderr (and the directory ls opened to list them) reach the job.
    fds = dict(re.findall(r" (\d+) -> (.*)$", out, re.MULTILINE))
    assert {"0", "1", "2"} <= set(fds), fds
    extra = {n: t for n, t in fds.items() if n not in ("0", "1", "2")}
    assert all(t.startswith("/proc/") for t in extra.values()), extra
    assert not server.unused(warm.ref)
    await pool.forget(warm)  # a no-op now: the job used it
    await trio.to_thread.run_sync(warm.cgroup.remove)
    assert warm.cgroup.v2 is None or not warm.cgroup.v2.exists()
    await await_for(lambda: pool.ready == 1, timeout=5, what="pool refilled behind the job")


async def test_a_taken_group_carries_the_jobs_limits(pool, server):
    warm = await pool.take(limit_files(300, 2, 17), netns=server.netns == "ok")
    assert warm is not None
    group = warm.cgroup
    try:
        if "memory" in group.v1:
            assert (group.v1["memory"] / "memory.limit_in_bytes").read_text().strip() == str(
                300 * 1024 * 1024
            )
        if "pids" in group.v1:
            assert (group.v1["pids"] / "pids.max").read_text().strip() == "17"
        if group.v2 is not None and (group.v2 / "memory.max").exists():
            assert (group.v2 / "memory.max").read_text().strip() == str(300 * 1024 * 1024)
        if group.v2 is None and not group.v1:
            pytest.fail("a taken warm start has no group")
    finally:
        await pool.forget(warm)
        await trio.to_thread.run_sync(group.remove)


async def test_limits_a_warm_group_refuses_mean_a_cold_start_not_a_failure(pool, server):
    bogus = {
        "v2": {"cgroup.max.descendants": "bogus"},
        "memory": {"notify_on_release": "bogus"},
        "pids": {"notify_on_release": "bogus"},
    }
    spare = pool._ready[0]
    assert await pool.take(bogus, netns=server.netns == "ok") is None
    await await_for(lambda: _zombie_or_gone(spare.stem), timeout=5, what="stem dropped")
    for path in [spare.cgroup.v2, *spare.cgroup.v1.values()]:
        assert path is None or not path.exists()


async def test_an_unused_stem_is_killed_and_its_group_removable(pool, server):
    warm = await pool.take(limit_files(None, None, None), netns=server.netns == "ok")
    assert warm is not None
    await pool.forget(warm)
    await await_for(lambda: not Path(f"/proc/{warm.stem}").exists(), timeout=5, what="stem reaped")
    await trio.to_thread.run_sync(warm.cgroup.remove)  # empty now: rmdir works
    for path in [warm.cgroup.v2, *warm.cgroup.v1.values()]:
        assert path is None or not path.exists()


async def test_a_stem_that_does_not_fit_the_job_is_not_used(pool, server, tmp_path):
    if server.netns != "ok":
        pytest.skip("needs network namespaces to make a stem that does not fit")
    warm = await pool.take(limit_files(None, None, None), netns=True)
    assert warm is not None
    limits = job_limits(warm) | {"netns": False}  # this job may use the network
    result, out = await run(server, tmp_path, limits)
    assert result.exit_code == 0
    assert f"pid={warm.stem}" not in out  # started cold, with the network it asked for
    assert interfaces(out) != ["lo"], out  # the host's interfaces, not a private namespace
    assert not Path(f"/proc/{warm.stem}").exists() or _zombie_or_gone(warm.stem)
    await trio.to_thread.run_sync(warm.cgroup.remove)


async def test_after_a_job_of_the_other_kind_a_spare_of_that_kind_is_kept(pool, server):
    if server.netns != "ok":
        pytest.skip("without namespaces every spare is of the one kind")
    assert await pool.take(limit_files(None, None, None), netns=False) is None  # cold, once
    await await_for(lambda: pool.ready == 2, timeout=5, what="a spare without a netns")
    warm = await pool.take(limit_files(None, None, None), netns=False)
    assert warm is not None and warm.netns is False
    await await_for(lambda: pool.ready == 2, timeout=5, what="refilled, both kinds")
    assert sorted(w.netns for w in pool._ready) == [False, True]
    await pool.forget(warm)
    await trio.to_thread.run_sync(warm.cgroup.remove)


async def test_a_stem_killed_from_outside_falls_back_to_a_cold_start(
    pool, support, server, tmp_path
):
    warm = await pool.take(limit_files(None, None, None), netns=server.netns == "ok")
    assert warm is not None
    os.kill(warm.stem, signal.SIGKILL)
    await await_for(lambda: _zombie_or_gone(warm.stem), timeout=5, what="stem dead")
    result, out = await run(server, tmp_path, job_limits(warm))
    assert result.exit_code == 0, out
    assert f"pid={warm.stem}" not in out
    name = (warm.cgroup.v2 or next(iter(warm.cgroup.v1.values()))).name
    assert out.count(f"/{name}\n") == hierarchies(support), out  # still in the job's groups
    await trio.to_thread.run_sync(warm.cgroup.remove)


async def test_a_stem_that_failed_its_setup_is_not_used_the_job_starts_cold(
    support, server, tmp_path
):
    name = f"{PREFIX}t0.{os.getpid()}-{os.urandom(3).hex()}"
    bases = ([support.v2_base] if support.v2_base else []) + list(support.v1_bases.values())
    procs = [str(base / name / "cgroup.procs") for base in bases]
    pid, token = await server.prestart(procs, False)  # its groups do not exist yet
    await await_for(lambda: _zombie_or_gone(pid), timeout=5, what="stem gave up")
    group = JobCgroup.make(support, name)  # now they do
    try:
        limits = {"cgroup_procs": procs, "netns": False, "stem": (pid, token)}
        result, out = await run(server, tmp_path, limits)
        assert result.exit_code == 0, out
        assert f"pid={pid}" not in out  # forked cold
        assert out.count(f"/{name}\n") == len(bases), out  # and still joined the groups
    finally:
        group.remove()


async def test_a_stopped_stem_cannot_stall_the_server(support, tmp_path):
    fs = ForkServer(exec_timeout_s=1.0)
    await fs.open()
    try:
        group = JobCgroup.make(support, f"{PREFIX}t1.{os.getpid()}-{os.urandom(3).hex()}")
        pid, token = await fs.prestart(group.procs_files, False)
        name = (group.v2 or next(iter(group.v1.values()))).name
        await await_for(
            lambda: stem_joined(pid, name, hierarchies(support)), timeout=5, what="joined"
        )
        os.kill(pid, signal.SIGSTOP)  # what a hostile job of the same uid could do
        limits = {"cgroup_procs": group.procs_files, "netns": False, "stem": (pid, token)}
        with pytest.raises(ForkServerError, match="did not start"):
            await run(fs, tmp_path, limits)
        await await_for(lambda: _zombie_or_gone(pid), timeout=5, what="stopped stem killed")
        # Still in step: the next answer belongs to the next request.
        result, out = await run(fs, tmp_path, {})
        assert result.exit_code == 0 and "pid=" in out
        group.remove()
    finally:
        await fs.aclose()


async def test_stems_of_a_dead_server_are_not_used_after_its_restart(
    pool, support, server, tmp_path
):
    warm = await pool.take(limit_files(None, None, None), netns=server.netns == "ok")
    assert warm is not None
    server._proc.kill()  # the fork server dies; its stems die with it (PDEATHSIG)
    await await_for(lambda: server._proc.poll() is not None, timeout=5, what="server dead")
    result, out = await run(server, tmp_path, job_limits(warm))  # restarts the server
    assert result.exit_code == 0, out
    assert f"pid={warm.stem}" not in out
    name = (warm.cgroup.v2 or next(iter(warm.cgroup.v1.values()))).name
    assert out.count(f"/{name}\n") == hierarchies(support), out
    await trio.to_thread.run_sync(warm.cgroup.remove)


async def test_a_stem_moved_out_of_its_group_joins_it_again_before_exec(
    pool, support, server, tmp_path
):
    warm = await pool.take(limit_files(None, None, None), netns=server.netns == "ok")
    assert warm is not None
    name = (warm.cgroup.v2 or next(iter(warm.cgroup.v1.values()))).name
    await await_for(
        lambda: stem_joined(warm.stem, name, hierarchies(support)), timeout=5, what="joined"
    )
    first = Path(warm.cgroup.procs_files[0]).parent
    (first.parent.parent / "cgroup.procs").write_text(str(warm.stem))  # moved away
    assert not stem_joined(warm.stem, name, hierarchies(support))
    result, out = await run(server, tmp_path, job_limits(warm))
    assert result.exit_code == 0, out
    assert f"pid={warm.stem}" in out
    assert out.count(f"/{name}\n") == hierarchies(support), out
    await trio.to_thread.run_sync(warm.cgroup.remove)


async def test_the_server_refuses_to_reap_an_unused_stem(server):
    pid, token = await server.prestart([], False)
    with pytest.raises(ForkServerError, match="unused stem"):
        await server.reap(pid)
    await server.discard((pid, token))
    await await_for(lambda: _zombie_or_gone(pid), timeout=5, what="stem discarded")
    await server.discard((pid, token))  # a second discard is a no-op


async def test_a_refill_that_fails_in_any_way_never_ends_the_daemon(support):
    class Broken:
        async def prestart(self, *_: object) -> tuple[int, int]:
            raise RuntimeError("not an OSError")

    warm_pool = WarmPool(support, Broken(), netns=False)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(warm_pool.run)
        assert warm_pool.failures == 1 and warm_pool.ready == 0
        nursery.cancel_scope.cancel()


async def test_closing_the_pool_kills_spares_and_removes_their_groups(support, server):
    warm_pool = WarmPool(support, server, netns=False, size=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(warm_pool.run)
        await await_for(lambda: warm_pool.ready == 2, timeout=5, what="two spares")
        spares = list(warm_pool._ready)
        nursery.cancel_scope.cancel()
    assert warm_pool.ready == 0
    for warm in spares:
        await await_for(lambda w=warm: _zombie_or_gone(w.stem), timeout=5, what="spare stem killed")
        for path in [warm.cgroup.v2, *warm.cgroup.v1.values()]:
            assert path is None or not path.exists(), path


def test_stale_groups_of_gone_daemons_are_removed(tmp_path):
    base = tmp_path / "jobs"
    base.mkdir()
    own, dead = os.getpid(), _dead_pid()
    mine = owner_tag()  # this process's live token
    names = {
        f"{PREFIX}0.{dead}-aaaaaa": False,  # a spare of a daemon that is gone
        f"job-1.a1.0a1b2c.{dead}-aaaaaa": False,  # a job group it made but never recorded
        f"{PREFIX}3.{own}-bbbbbb": False,  # our pid but no token of ours: an earlier life
        f"job-2.a1.0a1b2c.{mine}": True,  # ours, in use
        f"{PREFIX}0.1-cccccc": True,  # a live daemon's (pid 1 always runs)
        f"job-3.a1.0a1b2c.{dead}-dddddd": True,  # not empty: a job's stragglers, recovery's
        "job-7.a1.0123abcd": True,  # an older name without an owner: not ours to judge
        f"{PREFIX}garbage": True,
    }
    for name in names:
        (base / name).mkdir()
    (base / f"job-3.a1.0a1b2c.{dead}-dddddd" / "cgroup.procs").write_text("")
    support = CgroupSupport(v2_base=base)
    assert remove_stale(support) == 3
    for name, kept in names.items():
        assert (base / name).exists() == kept, name


def _dead_pid() -> int:
    pid = 4_000_000
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid


def _zombie_or_gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (FileNotFoundError, IndexError):
        return True
