"""Post-job GPU sweep over the fake NVML with real processes standing in for GPU users."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from aitbc_miner.gpu import GpuInventory
from aitbc_miner.gpu_sweep import JobMark, ProcFacts, belongs, read_facts, sweep
from aitbc_miner.metrics import Metrics
from tests.support import fake_nvml
from tests.support.fake_nvml import FakeNvml
from tests.support.procs import fake_job_processes

UID = os.getuid()


def facts(**kw) -> ProcFacts:
    base = dict(
        pid=500,
        uid=UID,
        pgid=500,
        sid=500,
        cgroups=(),
        env_job_id=None,
        env_attempt=None,
    )
    base.update(kw)
    return ProcFacts(**base)


MARK = JobMark("job-1", 2, pgid=400, cgroup="/sys/fs/cgroup/aitbc.slice/job-1.a2.5f3e")


@pytest.mark.parametrize(
    ("proc", "expected"),
    [
        (facts(pgid=400), "pgid"),
        (facts(sid=400), "sid"),
        (facts(cgroups=("/aitbc.slice/job-1.a2.5f3e",)), "cgroup"),  # v2
        (facts(cgroups=("/aitbc.slice/job-1.a2.5f3e/sub",)), "cgroup"),  # the job's sub-group
        (facts(cgroups=("/", "/aitbc.slice/job-1.a2.5f3e")), "cgroup"),  # v1 memory line
        (facts(cgroups=("/job-1.a2.5f3e",)), "cgroup"),  # below a cgroup namespace
        (facts(cgroups=("/aitbc.slice/job-1.a2.5f3e0",)), None),  # another name
        (facts(cgroups=("/aitbc.slice",)), None),
        (facts(env_job_id="job-1", env_attempt="2"), "env"),
        (facts(env_job_id="job-1", env_attempt="1"), None),  # an older attempt's process
        (facts(env_job_id="job-2", env_attempt="2"), None),
        (facts(), None),  # a stranger on the same GPU
        (facts(pgid=400, uid=UID + 1), None),  # another user's process: never
        (facts(pid=os.getpid(), pgid=400), None),  # never the daemon itself
    ],
)
def test_belongs(proc, expected):
    assert belongs(proc, MARK, uid=UID, own_pid=os.getpid()) == expected


def test_a_pgid_of_one_or_none_matches_nothing():
    for pgid in (None, 0, 1):
        mark = JobMark("job-1", 1, pgid=pgid)
        assert belongs(facts(pgid=1, sid=1), mark, uid=UID, own_pid=-1) is None


@pytest.fixture
def spawn() -> Iterator:
    with fake_job_processes() as start:
        yield start


def read_env_facts(pid: int) -> ProcFacts:
    deadline = time.monotonic() + 5
    while True:  # the environ of a just-forked child is its parent's until exec
        found = read_facts(pid)
        if found is not None and found.env_job_id is not None:
            return found
        assert time.monotonic() < deadline, "child never showed its environment"
        time.sleep(0.01)


def test_read_facts_of_a_real_process(spawn):
    proc = spawn("job-r", 3)
    got = read_env_facts(proc.pid)
    assert (got.uid, got.pgid, got.sid) == (UID, proc.pid, proc.pid)
    assert (got.env_job_id, got.env_attempt) == ("job-r", "3")
    assert read_facts(2**22 + 12345) is None


def inventory_with(*procs: dict) -> tuple[FakeNvml, GpuInventory, str]:
    scenario = fake_nvml.one_gpu()
    scenario["gpus"][0]["processes"] = list(procs)
    fake = FakeNvml(scenario)
    inv = GpuInventory(fake)
    return fake, inv, inv.snapshot()[0].uuid


async def test_sweep_kills_the_jobs_leftover_and_spares_strangers(spawn):
    ours, stranger = spawn("job-1"), spawn("job-2")
    for proc in (ours, stranger):
        read_env_facts(proc.pid)
    _, inv, uuid = inventory_with(
        {"pid": ours.pid, "used_mb": 700}, {"pid": stranger.pid, "used_mb": 300}
    )
    metrics = Metrics()
    report = await sweep(inv, [uuid], JobMark("job-1", 1), grace_s=10, metrics=metrics)
    assert report.killed == [(uuid, ours.pid, "env")]
    assert report.quarantined == []
    assert ours.wait(timeout=5) == -9
    assert stranger.poll() is None
    assert metrics.registry.get_sample_value("aitbc_miner_gpu_sweep_kills_total") == 1
    assert inv.snapshot()[0].available


async def test_sweep_matches_the_process_group(spawn):
    leader = spawn("unrelated-env")
    read_env_facts(leader.pid)
    _, inv, uuid = inventory_with({"pid": leader.pid, "used_mb": 10})
    report = await sweep(inv, [uuid], JobMark("job-9", 1, pgid=leader.pid), grace_s=10)
    assert report.killed == [(uuid, leader.pid, "pgid")]
    assert leader.wait(timeout=5) == -9


async def test_memory_not_released_quarantines_the_gpu_until_it_is(spawn):
    ours = spawn("job-1")
    read_env_facts(ours.pid)
    # sticky: the "driver" keeps listing the process after it died
    fake, inv, uuid = inventory_with({"pid": ours.pid, "used_mb": 900, "sticky": True})
    started = time.monotonic()
    report = await sweep(inv, [uuid], JobMark("job-1", 1), grace_s=0.3, poll_s=0.05)
    assert time.monotonic() - started < 5
    assert report.quarantined == [uuid]
    assert ours.wait(timeout=5) == -9
    g = inv.snapshot()[0]
    assert not g.available and str(ours.pid) in g.reason
    fake.set_gpu(0, processes=[])  # the driver lets go at last
    assert inv.snapshot()[0].available


async def test_sweep_with_nvml_failing_does_nothing_and_does_not_raise():
    fake, inv, uuid = inventory_with()
    fake.set_gpu(0, error="gpu_lost")
    report = await sweep(inv, [uuid], JobMark("job-1", 1), grace_s=1)
    assert report.killed == [] and report.quarantined == []
