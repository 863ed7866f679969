"""GPUs and the model cache end to end: a real miner (with the fake NVML where GPUs are
needed, via tests/support/fake_nvml_launcher.py) against the real mock coordinator."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import httpx
import psutil

from tests.support import fake_nvml
from tests.support.jobs import sh_job, wait_final
from tests.support.minerproc import miner_env
from tests.support.wait import wait_for

LAUNCHER = "tests.support.fake_nvml_launcher"


def start_gpu_miner(tmp_path: Path, mock, miner_factory, scenario: dict, **env: str):
    path = tmp_path / "nvml.json"
    fake_nvml.write_scenario(path, scenario)
    env.setdefault("AITBC_MINER_RESOURCES__MAX_CONCURRENT_GPU", "2")
    # A long poll sent while every GPU slot was busy asks for CPU work only; keep it
    # short so a GPU job enqueued right after a slot frees up is not held back by it.
    env.setdefault("AITBC_MINER_COORDINATOR__PULL_WAIT_S", "0.5")
    miner = miner_factory(mock, launcher=LAUNCHER, AITBC_TEST_FAKE_NVML=str(path), **env)
    return miner, path


def miner_workspace(tmp_path: Path) -> Path:
    return Path(miner_env(tmp_path, None)["AITBC_MINER_WORKSPACE__ROOT"])


def last_heartbeat(mock, node_id: str = "node-test") -> dict:
    return mock.admin.node(node_id)["heartbeats"][-1]["body"]


# Each job says it started, then waits (bounded) for the test's "go", given only once
# both have started: proof they overlapped. Jobs see only their own workspace
# (Landlock), so the test, not the jobs, does the meeting.
RENDEZVOUS = (
    'echo "$CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER" > out.txt; touch started; i=0; '
    "while [ ! -e go ]; do i=$((i+1)); [ $i -gt 400 ] && exit 3; sleep 0.05; done"
)


def test_two_gpu_jobs_run_concurrently_on_the_two_emptiest_gpus(tmp_path, mock, miner_factory):
    scenario = fake_nvml.four_mixed()  # free MiB: 4096, 71680, 15360, 40960
    uuids = [g["uuid"] for g in scenario["gpus"]]
    miner, _ = start_gpu_miner(tmp_path, mock, miner_factory, scenario)
    gpu_req = {"gpu": True, "gpu_count": 1, "vram_mb": 10000}
    for job_id in ("gpu-a", "gpu-b"):
        mock.admin.enqueue(
            sh_job(job_id, RENDEZVOUS, requirements=gpu_req, artifacts=[{"path": "out.txt"}]),
            retry=False,
        )
    work = {job_id: miner.workspace / job_id / "work" for job_id in ("gpu-a", "gpu-b")}
    wait_for(
        lambda: all((w / "started").exists() for w in work.values()),
        timeout=20,
        what="both GPU jobs running at once",
    )
    for w in work.values():
        (w / "go").touch()
    jobs = {job_id: wait_final(mock, job_id) for job_id in work}
    seen = {}
    for job_id, job in jobs.items():
        assert job["state"] == "succeeded", job
        visible, order = mock.admin.artifact(job_id, "out.txt").decode().split()
        assert order == "PCI_BUS_ID"
        (index,) = job["result"]["usage"]["gpu"]
        assert uuids[index] == visible
        state = json.loads((miner.workspace / job_id / "state.json").read_text())
        assert state["gpus"] == [visible]
        seen[job_id] = index
    assert sorted(seen.values()) == [1, 3]

    # Inventory in the descriptor, heartbeats and /metrics.
    node = mock.admin.node("node-test")
    assert [g["uuid"] for g in node["descriptor"]["gpu"]] == uuids
    assert node["descriptor"]["slots"]["gpu"] == 2
    free = {g["index"]: g["vram_free_mb"] for g in last_heartbeat(mock)["gpu_free"]}
    assert free == {0: 4096, 1: 71680, 2: 15360, 3: 40960}
    metrics = httpx.get(f"{miner.health_url}/metrics").text
    assert f'aitbc_miner_gpu_memory_total_bytes{{index="1",uuid="{uuids[1]}"}}' in metrics
    assert f'aitbc_miner_gpu_available{{index="2",uuid="{uuids[2]}"}} 1.0' in metrics

    # More VRAM than any GPU has: handed out (the mock does not filter by VRAM), E_NOGPU.
    mock.admin.enqueue(
        sh_job("gpu-huge", "true", requirements={"gpu": True, "vram_mb": 100_000}),
        retry=False,
    )
    fail = wait_final(mock, "gpu-huge")["fails"][-1]
    assert (fail["error_code"], fail["retryable"]) == ("E_NOGPU", True), fail


def test_leftover_gpu_process_is_reaped_slots_freed_and_a_failing_gpu_comes_back(
    tmp_path, mock, miner_factory
):
    # The job writes its straggler's pid into its own work/; the fake NVML (inside the
    # miner, not confined) lists that pid as a compute process on GPU 0.
    pid_file = miner_workspace(tmp_path) / "gpu-leak" / "work" / "leftover.pid"
    scenario = {  # only GPU 0 fits the 20 GB jobs below; one GPU job at a time
        "gpus": [
            fake_nvml.gpu(0, 24576, 1024, pid_files=[str(pid_file)], pid_file_mb=700),
            fake_nvml.gpu(1, 8192, 1024),
        ]
    }
    miner, path = start_gpu_miner(
        tmp_path,
        mock,
        miner_factory,
        scenario,
        AITBC_MINER_GPU__SWEEP_GRACE_S="5",
        AITBC_MINER_RESOURCES__MAX_CONCURRENT_GPU="1",
        # Without a job cgroup (not delegated, or off) the process group is all the
        # runner can kill at exit; the sweep is what finds a straggler that left it.
        AITBC_MINER_RESOURCES__CGROUP="off",
    )
    big = {"gpu": True, "vram_mb": 20000}
    # setsid: the straggler leaves the job's process group and session, so only the
    # sweep (by the job's AITBC_JOB_ID in its environment) can find it. The job waits
    # until it has left (field 6 of /proc/<pid>/stat is the session), or the group
    # kill at the job's exit could still catch it.
    script = (
        "setsid sleep 300 </dev/null >/dev/null 2>&1 & s=$!; echo $s > leftover.pid; i=0; "
        'while [ "$(cut -d" " -f6 /proc/$s/stat)" = "$$" ] && [ $i -lt 500 ]; do '
        "i=$((i+1)); sleep 0.01; done; echo ok > out.txt"
    )
    mock.admin.enqueue(
        sh_job("gpu-leak", script, requirements=big, artifacts=[{"path": "out.txt"}]),
        retry=False,
    )
    assert wait_final(mock, "gpu-leak")["state"] == "succeeded"
    pid = int(pid_file.read_text())
    try:
        killed = miner.wait_event("gpu_sweep_killed", job_id="gpu-leak")
        assert killed["pid"] == pid and killed["uuid"] == scenario["gpus"][0]["uuid"]
        assert killed["matched_by"] == "env"
        wait_for(
            lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
            timeout=10,
            what="leftover process gone",
        )
        assert not miner.find("gpu_quarantined")
    finally:
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie":
            os.kill(pid, 9)
    metrics = httpx.get(f"{miner.health_url}/metrics").text
    assert "aitbc_miner_gpu_sweep_kills_total 1.0" in metrics

    # The slot and GPU 0 come back after a failure and after a cancel too: with one
    # GPU slot, a leak on either path would leave the next job unserved or E_NOGPU.
    mock.admin.enqueue(sh_job("gpu-exit", "exit 3", requirements=big), retry=False)
    assert wait_final(mock, "gpu-exit")["fails"][-1]["error_code"] == "E_EXIT"
    marker = miner.workspace / "gpu-cancel" / "work" / "started"
    mock.admin.enqueue(
        sh_job("gpu-cancel", "touch started; exec sleep 60", requirements=big), retry=False
    )
    wait_for(marker.exists, timeout=15, what="cancel job running")
    mock.admin.cancel("gpu-cancel")
    assert wait_final(mock, "gpu-cancel")["fails"][-1]["error_code"] == "E_CANCELLED"
    mock.admin.enqueue(sh_job("gpu-after", "true", requirements=big), retry=False)
    after = wait_final(mock, "gpu-after")
    assert after["state"] == "succeeded", after
    assert after["result"]["usage"]["gpu"] == [0]

    # GPU 1 falls off the bus: gone from gpu_free, the daemon lives on; then it is back.
    scenario["gpus"][1]["error"] = "gpu_lost"
    fake_nvml.write_scenario(path, scenario)
    uuid1 = scenario["gpus"][1]["uuid"]
    wait_for(
        lambda: [g["index"] for g in last_heartbeat(mock)["gpu_free"]] == [0],
        timeout=15,
        what="lost GPU dropped from heartbeats",
    )
    miner.wait_event("gpu_marked_unavailable", uuid=uuid1)
    scenario["gpus"][1]["error"] = None
    fake_nvml.write_scenario(path, scenario)
    wait_for(
        lambda: [g["index"] for g in last_heartbeat(mock)["gpu_free"]] == [0, 1],
        timeout=15,
        what="GPU back in heartbeats",
    )
    miner.wait_event("gpu_available_again", uuid=uuid1)
    assert miner.proc.poll() is None


def test_model_cache_downloads_once_and_eviction_respects_pins(mock, miner_factory):
    blobs = {name: (name * 600).encode() for name in ("a", "b", "c")}
    files = {name: mock.admin.add_file(f"{name}.bin", data) for name, data in blobs.items()}
    pinned = json.dumps([files["a"]["sha256"]])
    # Room for two 600-byte entries, not three.
    miner = miner_factory(
        mock, AITBC_MINER_CACHE__MAX_GB=str(1500 / 2**30), AITBC_MINER_CACHE__PINNED=pinned
    )

    def run(job_id: str, name: str) -> None:
        info = files[name]
        mock.admin.enqueue(
            sh_job(
                job_id,
                "sha256sum model.bin > out.txt",
                input={
                    "urls": [
                        {
                            "url": info["url"],
                            "path": "model.bin",
                            "sha256": info["sha256"],
                            "cache": True,
                        }
                    ]
                },
                artifacts=[{"path": "out.txt"}],
            ),
            retry=False,
        )
        job = wait_final(mock, job_id)
        assert job["state"] == "succeeded", job
        out = mock.admin.artifact(job_id, "out.txt").decode()
        assert out.split()[0] == hashlib.sha256(blobs[name]).hexdigest()

    def downloads(name: str) -> int:
        return mock.admin.stats()["downloads"][f"{name}.bin"]["downloads"]

    run("cache-a1", "a")  # pinned, and from now on the least recently used
    run("cache-b1", "b")
    run("cache-c1", "c")  # no room: evicts b, the LRU entry that is not pinned
    run("cache-a2", "a")
    assert downloads("a") == 1  # the second job with the same input did not fetch it
    run("cache-b2", "b")
    assert downloads("b") == 2  # b was the one evicted
    assert downloads("c") == 1
    metrics = httpx.get(f"{miner.health_url}/metrics").text
    assert "aitbc_miner_cache_hits_total 1.0" in metrics
    assert "aitbc_miner_cache_misses_total 4.0" in metrics
    assert "aitbc_miner_cache_evictions_total 2.0" in metrics
