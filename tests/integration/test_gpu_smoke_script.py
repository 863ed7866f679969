"""scripts/gpu-smoke.sh in its real mode (no --fake), over the fake C NVML.

The smoke script is for whoever has a real NVIDIA GPU; nothing else runs it, so
these tests keep it from rotting. They run it as a subprocess exactly as a user
would, only with LD_LIBRARY_PATH and $AITBC_FAKE_NVML_CONFIG pointing the real
pynvml at tests/support/nvml_shim (fake_nvml.c built as libnvidia-ml.so.1). The
script's probe (`python -m aitbc_miner probe`) and its real miner both inherit
that environment, so the real bindings and the real inventory code run in both.

`nvidia-smi` inside the job: a fake one (printing `nvidia-smi -L` lines for the
shim's GPUs) is put first on the script's PATH, but a job never sees it. The
miner gives every job its own PATH (runners.base.DEFAULT_PATH, set in
jobs.Job._plan; PATH is a reserved name a manifest cannot set) and Landlock lets
a job read only the system dirs, its workspace and its program's directory. No
mechanism of the miner puts a test directory on a job's PATH, and the tests will
not write into /usr/local/bin, so the job takes the script's
"nvidia-smi=not-installed" branch, which is asserted, together with the fact that
the fake was never run (if the daemon's PATH ever leaked into jobs, this fails).
There is no libcuda.so.1 here, so the job also takes the "CUDA driver API not
usable" branch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aitbc_miner.runners.base import DEFAULT_PATH
from tests.support import fake_nvml, nvml_shim
from tests.support.minerproc import REPO

SCRIPT = REPO / "scripts" / "gpu-smoke.sh"
DRIVER, CUDA, CUDA_SHOWN = "570.124.06", 12080, "12.8"
ARTIFACT_START = "---- job artifact gpu.txt ----"
ARTIFACT_END = "------------------------------"


@pytest.fixture(scope="module")
def shim_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if nvml_shim.compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build the fake libnvidia-ml.so.1")
    return nvml_shim.build(tmp_path_factory.getbasetemp() / "nvml-shim")


@pytest.fixture
def no_real_nvidia_smi() -> None:
    """A job that runs would find a real nvidia-smi on its own PATH and list real GPUs."""
    if real := shutil.which("nvidia-smi", path=DEFAULT_PATH):
        pytest.skip(f"{real} is on a job's PATH: it lists the real GPUs, not the shim's")


def scenario() -> dict[str, Any]:
    """Four mixed GPUs (free MiB 4096, 71680, 15360, 40960), a newer driver."""
    s = fake_nvml.four_mixed()
    s.update(driver=DRIVER, cuda=CUDA)
    s["gpus"][3]["pci"] = "00000001:C1:1F.0"
    return s


def emptiest(s: dict[str, Any]) -> tuple[int, str]:
    """(index, uuid) of the GPU the least-used-vram policy picks: the most free VRAM."""
    i, g = max(enumerate(s["gpus"]), key=lambda ig: ig[1]["total_mb"] - ig[1]["used_mb"])
    return i, g["uuid"]


def fake_nvidia_smi(bin_dir: Path, s: dict[str, Any], marker: Path) -> None:
    """`nvidia-smi -L` as the real one prints it for the shim's GPUs; touches `marker`."""
    listing = "".join(
        f"GPU {i}: {g['name']} (UUID: {g['uuid']})\n" for i, g in enumerate(s["gpus"])
    )
    bin_dir.mkdir(parents=True, exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    script = ["#!/bin/sh", f': > "{marker}"', '[ "$1" = "-L" ] || exit 2', "cat <<'EOF'"]
    smi.write_text("\n".join(script) + "\n" + listing + "EOF\n")
    smi.chmod(0o755)


@dataclass
class Smoke:
    rc: int
    out: str
    err: str
    work: Path

    def lines(self, prefix: str = "") -> list[str]:
        return [line for line in self.out.splitlines() if line.startswith(prefix)]

    def artifact(self) -> list[str]:
        lines = self.out.splitlines()
        assert ARTIFACT_START in lines, self
        start = lines.index(ARTIFACT_START) + 1
        return lines[start : lines.index(ARTIFACT_END, start)]

    def __str__(self) -> str:
        log = self.work / "miner-node-test.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:]) if log.exists() else ""
        return f"rc={self.rc}\n--- stdout\n{self.out}\n--- stderr\n{self.err}\n--- miner\n{tail}"


def run_smoke(
    shim_lib: Path,
    tmp_path: Path,
    s: dict[str, Any],
    *,
    on_output: Callable[[str, Path], bool] | None = None,
    timeout: float = 60,
) -> Smoke:
    """Run scripts/gpu-smoke.sh with the shim as the driver's NVML and `s` its inventory.

    `on_output(stdout so far, config path)` is polled while it runs until it returns True.
    """
    config = tmp_path / "nvml.conf"
    nvml_shim.write_config(config, s)
    work = tmp_path / "smoke"
    fake_nvidia_smi(tmp_path / "bin", s, tmp_path / "nvidia-smi-ran")
    env = nvml_shim.env(shim_lib, config)
    env = {k: v for k, v in env.items() if not k.startswith(("AITBC_MINER_", "AITBC_TEST_"))}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(
        PATH=f"{tmp_path / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
        GPU_SMOKE_DIR=str(work),
        PYTHON=sys.executable,
    )
    assert shutil.which("nvidia-smi", path=env["PATH"]) == str(tmp_path / "bin" / "nvidia-smi")
    out_path, err_path = tmp_path / "smoke.out", tmp_path / "smoke.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [str(SCRIPT)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
            cwd=tmp_path,  # the script finds the repository itself
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if on_output is not None and on_output(out_path.read_text(errors="replace"), config):
                on_output = None
            time.sleep(0.01)
    finally:
        timed_out = proc.poll() is None  # (or the test was interrupted)
        if timed_out:
            proc.send_signal(signal.SIGINT)  # the script's `finally` stops its mock and miner
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            with contextlib.suppress(ProcessLookupError):  # what it had not stopped yet
                os.killpg(proc.pid, signal.SIGKILL)
    if timed_out:
        pytest.fail(f"gpu-smoke.sh still running after {timeout}s:\n{out_path.read_text()}")
    return Smoke(proc.returncode, out_path.read_text(), err_path.read_text(), work)


def probe_lines(s: dict[str, Any]) -> list[str]:
    return [
        f"gpu-smoke: GPU {i}: {g['name']} {g['uuid']} {g['total_mb']} MiB "
        f"pci={g['pci']} driver={DRIVER} cuda={CUDA_SHOWN}"
        for i, g in enumerate(s["gpus"])
    ]


def check_no_cuda(smoke: Smoke, artifact_tail: list[str]) -> None:
    """The job's CUDA driver API probe found no usable driver (no libcuda.so.1 here)."""
    assert len(artifact_tail) >= 1, smoke
    assert artifact_tail[0].startswith("cuda_driver=unavailable") or (
        artifact_tail[0].startswith("cuda_init_rc=") and artifact_tail[0] != "cuda_init_rc=0"
    ), smoke
    assert (
        "gpu-smoke: CUDA driver API not usable inside the job; only NVML/nvidia-smi checked"
        in smoke.lines()
    ), smoke


def test_four_gpus_the_job_runs_on_the_emptiest_and_passes(shim_lib, tmp_path, no_real_nvidia_smi):
    s = scenario()
    index, uuid = emptiest(s)
    assert (index, uuid) == (1, s["gpus"][1]["uuid"])  # the H100, 71680 MiB free
    smoke = run_smoke(shim_lib, tmp_path, s)
    assert smoke.rc == 0, smoke
    # the probe: every GPU as the real pynvml read it from the shim, in order
    assert smoke.lines("gpu-smoke: GPU ") == probe_lines(s), smoke
    # the job: CUDA_VISIBLE_DEVICES is the GPU the miner (over the shim as well) chose
    artifact = smoke.artifact()
    assert artifact[:3] == [
        f"CUDA_VISIBLE_DEVICES={uuid}",
        "CUDA_DEVICE_ORDER=PCI_BUS_ID",
        "nvidia-smi=not-installed",
    ], smoke
    check_no_cuda(smoke, artifact[3:])
    assert "gpu-smoke: nvidia-smi not installed; skipped its check" in smoke.lines(), smoke
    assert not (tmp_path / "nvidia-smi-ran").exists(), "the daemon's PATH reached the job"
    assert smoke.lines("gpu-smoke: FAIL") == [], smoke
    passed = [f"gpu-smoke: PASS: job ran on GPU {index} ({uuid})"]
    assert smoke.lines("gpu-smoke: PASS") == passed, smoke
    assert smoke.lines()[-1] == f"gpu-smoke: files kept in {smoke.work}", smoke
    assert (smoke.work / "allowlist" / "sh.yaml").is_file()
    assert (smoke.work / "miner-node-test.log").is_file()


@pytest.mark.parametrize(
    ("inventory", "why"),
    [
        pytest.param(
            {"init_error": "driver_not_loaded", "gpus": []},
            "none schedulable: NVMLError_DriverNotLoaded: Driver Not Loaded",
            id="driver-not-loaded",
        ),
        pytest.param(
            {
                "gpus": [
                    fake_nvml.gpu(0, 81920, 0, name="NVIDIA A100-SXM4-80GB", mig=True),
                    fake_nvml.gpu(1, 24576, 0, name="NVIDIA GeForce RTX 3090", error="gpu_lost"),
                ]
            },
            "none schedulable: GPU 0: MIG mode; GPU 1: NVMLError_GpuIsLost: GPU is lost",
            id="mig-and-lost-gpu",
        ),
    ],
)
def test_no_schedulable_gpu_exits_2_before_starting_anything(shim_lib, tmp_path, inventory, why):
    smoke = run_smoke(shim_lib, tmp_path, inventory)
    assert smoke.rc == 2, smoke
    assert smoke.lines("gpu-smoke: GPU ") == [], smoke
    (line,) = smoke.lines("gpu-smoke: no schedulable GPU visible to NVML: ")
    assert why in line, smoke
    assert smoke.lines()[-1] == line, smoke
    assert not (smoke.work / "allowlist").exists()  # no mock coordinator, no miner
    assert not (smoke.work / "mock").exists()


def test_a_gpu_the_probe_never_listed_fails_the_check(shim_lib, tmp_path, no_real_nvidia_smi):
    """Between the probe and the miner the driver's GPUs change UUIDs: exit 1."""
    s = scenario()
    swapped = scenario()
    for i, g in enumerate(swapped["gpus"]):
        g["uuid"] = f"GPU-{i:08x}-swap-4000-8000-{i:012x}"

    def swap(out: str, config: Path) -> bool:
        # The probe's lines come before the mock coordinator and the miner start (two
        # interpreter start-ups, several hundred ms, away; this polls every 10 ms):
        # the miner only ever sees `swapped`.
        if "gpu-smoke: GPU 3:" not in out:
            return False
        nvml_shim.write_config(config, swapped)
        return True

    smoke = run_smoke(shim_lib, tmp_path, s, on_output=swap)
    assert smoke.rc == 1, smoke
    assert smoke.lines("gpu-smoke: GPU ") == probe_lines(s), smoke
    _, new_uuid = emptiest(swapped)
    assert smoke.artifact()[0] == f"CUDA_VISIBLE_DEVICES={new_uuid}", smoke
    assert smoke.lines("gpu-smoke: FAIL") == [
        f"gpu-smoke: FAIL: CUDA_VISIBLE_DEVICES={new_uuid!r} is not one probed GPU UUID"
    ], smoke
    assert smoke.lines("gpu-smoke: PASS") == [], smoke
