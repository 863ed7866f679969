"""The agent's GPU bookkeeping over the fake NVML: claims, release, pull filters, heartbeats."""

from __future__ import annotations

from pathlib import Path

from aitbc_miner.agent import Agent
from aitbc_miner.allowlist import load_allowlist
from aitbc_miner.manifest import parse_manifest
from tests.support import fake_nvml
from tests.support.agentcfg import agent_config
from tests.support.fake_nvml import FakeNvml


def make_agent(tmp_path: Path, scenario: dict, **env: str) -> Agent:
    cfg = agent_config(tmp_path, AITBC_MINER_RESOURCES__MAX_CONCURRENT_GPU="4", **env)
    return Agent(cfg, load_allowlist([]), nvml=FakeNvml(scenario))


def gpu_manifest(job_id: str, vram_mb: int, count: int = 1):
    return parse_manifest(
        {
            "job_id": job_id,
            "runner": "cli",
            "timeout_s": 10,
            "command": "true",
            "requirements": {"gpu": True, "gpu_count": count, "vram_mb": vram_mb},
        }
    )


def test_claims_follow_the_policy_and_are_released_by_job(tmp_path):
    agent = make_agent(tmp_path, fake_nvml.four_mixed())
    assert agent.pull_filters()["gpu_slots_free"] == 4
    assert agent.pull_filters()["vram_free_mb"] == [4096, 71680, 15360, 40960]

    (first,) = agent._choose_gpus(gpu_manifest("j1", 10000))
    assert first.index == 1
    filters = agent.pull_filters()
    assert filters["gpu_slots_free"] == 3
    assert filters["vram_free_mb"] == [4096, 15360, 40960]  # GPU 1 has no slot left
    pair = agent._choose_gpus(gpu_manifest("j2", 10000, count=2))
    assert [g.index for g in pair] == [2, 3]
    assert agent._choose_gpus(gpu_manifest("j3", 10000)) == ()  # GPU 0 is too full

    agent._release_gpus("j1")
    agent._release_gpus("j1")  # idempotent
    assert agent.gpu_in_use[first.uuid] == 0 and agent.gpu_reserved_mb[first.uuid] == 0
    agent._release_gpus("j2")
    assert sum(agent.gpu_in_use.values()) == 0
    assert agent.pull_filters()["gpu_slots_free"] == 4


def test_jobs_per_gpu_shares_a_device_within_its_vram(tmp_path):
    agent = make_agent(tmp_path, fake_nvml.one_gpu(), AITBC_MINER_GPU__JOBS_PER_GPU="2")
    assert agent.gpu_capacity == 2
    agent._choose_gpus(gpu_manifest("j1", 10000))
    heartbeat = agent.heartbeat_body(1)["gpu_free"]
    assert heartbeat[0]["vram_free_mb"] == 16384 - 10000  # reserved, not yet allocated
    assert agent.pull_filters()["vram_free_mb"] == [6384]
    assert agent._choose_gpus(gpu_manifest("j2", 7000)) == ()
    assert len(agent._choose_gpus(gpu_manifest("j3", 6000))) == 1
    assert agent.pull_filters()["gpu_slots_free"] == 0


def test_cpu_only_node_advertises_no_gpu(tmp_path):
    agent = make_agent(tmp_path, fake_nvml.no_gpu())
    assert agent.gpus == [] and agent.gpu_capacity == 0
    filters = agent.pull_filters()
    assert (filters["gpu_slots_free"], filters["vram_free_mb"]) == (0, [])
    assert agent.heartbeat_body(1)["gpu_free"] == []
    assert agent.descriptor()["gpu"] == [] and "cuda" not in agent.descriptor()["tags"]
    assert agent._choose_gpus(gpu_manifest("j1", 0)) == ()


def test_descriptor_lists_schedulable_gpus(tmp_path):
    scenario = fake_nvml.four_mixed()
    scenario["gpus"][3]["mig"] = True
    agent = make_agent(tmp_path, scenario)
    desc = agent.descriptor()
    assert [g["index"] for g in desc["gpu"]] == [0, 1, 2]
    assert desc["slots"]["gpu"] == 3 and "cuda" in desc["tags"]
    assert desc["gpu"][1]["cuda"] == {"version": "12.4", "driver": "550.54.15"}
