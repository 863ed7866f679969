#!/usr/bin/env bash
# GPU smoke test, for whoever has a real NVIDIA GPU (driver + NVML installed).
#
#   scripts/gpu-smoke.sh          probe the GPUs through NVML, start the mock coordinator
#                                 and a real miner, run one GPU job that writes
#                                 CUDA_VISIBLE_DEVICES, `nvidia-smi -L` and what the CUDA
#                                 driver API sees under that variable into its artifact,
#                                 and check it. Exit 0 = pass, 1 = fail, 2 = no GPU.
#   scripts/gpu-smoke.sh --fake   the same plumbing with the fake NVML (no GPU needed).
#
# Needs .venv with the test extras (`make test` builds it, or
# `python3 -m venv .venv && .venv/bin/pip install -e '.[test]'`). Everything runs on
# loopback; files stay in $GPU_SMOKE_DIR (default: a fresh /tmp/gpu-smoke-*) for triage.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" - "$@" <<'PY'
import json, os, subprocess, sys, tempfile, time
from pathlib import Path

from tests.support import fake_nvml
from tests.support.minerproc import DEV_CONFIG, start_miner
from tests.support.mockproc import start_mock
from tests.support.wait import wait_for

fake = "--fake" in sys.argv[1:]
work = Path(os.environ.get("GPU_SMOKE_DIR") or tempfile.mkdtemp(prefix="gpu-smoke-"))
work.mkdir(parents=True, exist_ok=True)
launcher, extra_env = "aitbc_miner", {}
if fake:
    scenario = work / "nvml.json"
    fake_nvml.write_scenario(scenario, fake_nvml.four_mixed())
    launcher, extra_env = "tests.support.fake_nvml_launcher", {"AITBC_TEST_FAKE_NVML": str(scenario)}


def say(msg):
    print(f"gpu-smoke: {msg}", flush=True)


# 1. probe: what NVML shows, through the miner's own inventory code, with the settings
# the miner below gets (the dev config, no AITBC_MINER_* from the caller's shell).
probe_env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_")}
probe = subprocess.run(
    [sys.executable, "-m", launcher, "probe", "--config", str(DEV_CONFIG)],
    env={**probe_env, **extra_env}, capture_output=True, text=True, check=False,
)
if probe.returncode != 0:
    say(f"probe failed ({probe.returncode}): {probe.stderr.strip()}")
    sys.exit(1)
gpus = json.loads(probe.stdout)["gpu"]
for g in gpus:
    say(f"GPU {g['index']}: {g['name']} {g['uuid']} {g['vram_mb']} MiB "
        f"pci={g['pci_bus_id']} driver={g['cuda']['driver']} cuda={g['cuda']['version']}")
if not gpus:
    # probe's last stderr line says why ("gpu: none schedulable: <reasons>")
    why = next((ln[5:] for ln in reversed(probe.stderr.splitlines()) if ln.startswith("gpu: ")),
               probe.stderr.strip() or "none listed")
    say(f"no schedulable GPU visible to NVML: {why}")
    sys.exit(2)
by_uuid = {g["uuid"]: g for g in gpus}

# 2. mock coordinator + miner, with a smoke-only allowlist entry for /bin/sh.
allow = work / "allowlist"
allow.mkdir(exist_ok=True)
(allow / "sh.yaml").write_text(
    'name: sh\ncommand: {path: "/bin/sh"}\nargs: [["-c", ".{1,4000}"]]\n'
    'env: ["JOB_.*"]\nmax_runtime_s: 120\n'
)
mock = start_mock(work / "mock")
miner = None
status = 1
try:
    miner = start_miner(
        work, mock, launcher=launcher,
        AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES=json.dumps([f"{allow}/*.yaml"]),
        AITBC_MINER_LOGGING__LEVEL="info", **extra_env,
    )
    cuda_probe = r'''
import ctypes
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as exc:
    print("cuda_driver=unavailable", exc); raise SystemExit(0)
rc = cuda.cuInit(0)
count = ctypes.c_int(0)
if rc == 0:
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
print("cuda_init_rc=%d" % rc)
print("cuda_devices=%d" % count.value)
for i in range(count.value):
    dev = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(dev), i)
    raw = (ctypes.c_ubyte * 16)()
    cuda.cuDeviceGetUuid(raw, dev.value)
    b = bytes(raw).hex()
    print("cuda_uuid=GPU-%s-%s-%s-%s-%s" % (b[:8], b[8:12], b[12:16], b[16:20], b[20:]))
'''
    script = (
        '{ echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; '
        'echo "CUDA_DEVICE_ORDER=$CUDA_DEVICE_ORDER"; '
        'if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L; '
        'else echo "nvidia-smi=not-installed"; fi; '
        'if command -v python3 >/dev/null 2>&1; then python3 -c "$JOB_CUDA_PROBE"; fi; '
        '} > gpu.txt 2>&1'
    )
    mock.admin.enqueue({
        "job_id": "gpu-smoke-1", "runner": "cli", "timeout_s": 120, "command": "sh",
        "args": ["-c", script], "env": {"JOB_CUDA_PROBE": cuda_probe},
        "requirements": {"gpu": True, "gpu_count": 1, "vram_mb": 256},
        "artifacts": [{"path": "gpu.txt", "type": "text/plain"}],
    }, retry=False)
    job = wait_for(
        lambda: (j := mock.admin.job("gpu-smoke-1"))["state"]
        in ("succeeded", "failed", "cancelled", "expired") and j,
        timeout=90, what="smoke job final",
    )
    if job["state"] != "succeeded":
        say(f"job {job['state']}: {json.dumps(job.get('fails'))[:2000]}")
        sys.exit(1)
    text = mock.admin.artifact("gpu-smoke-1", "gpu.txt").decode(errors="replace")
    print("---- job artifact gpu.txt ----\n" + text.rstrip() + "\n------------------------------")
    facts = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and " " not in line.split("=", 1)[0])
    visible = facts.get("CUDA_VISIBLE_DEVICES", "")
    problems = []
    if visible not in by_uuid:
        problems.append(f"CUDA_VISIBLE_DEVICES={visible!r} is not one probed GPU UUID")
    if facts.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        problems.append("CUDA_DEVICE_ORDER is not PCI_BUS_ID")
    usage = job["result"]["usage"]
    if visible in by_uuid and usage.get("gpu") != [by_uuid[visible]["index"]]:
        problems.append(f"usage.gpu {usage.get('gpu')} does not name GPU {visible}")
    if not fake:
        smi = [line for line in text.splitlines() if line.startswith("GPU ") and "UUID:" in line]
        if "nvidia-smi=not-installed" in text:
            say("nvidia-smi not installed; skipped its check")
        elif not any(visible in line for line in smi):
            problems.append("nvidia-smi -L inside the job does not list the assigned GPU")
        if facts.get("cuda_init_rc") == "0":
            if facts.get("cuda_devices") != "1":
                problems.append(f"CUDA sees {facts.get('cuda_devices')} devices, expected 1")
            if facts.get("cuda_uuid") != visible:
                problems.append(f"CUDA device is {facts.get('cuda_uuid')}, expected {visible}")
        else:
            say("CUDA driver API not usable inside the job; only NVML/nvidia-smi checked")
    if problems:
        for p in problems:
            say(f"FAIL: {p}")
        sys.exit(1)
    say(f"PASS: job ran on GPU {by_uuid[visible]['index']} ({visible})"
        + (" [fake NVML]" if fake else ""))
    status = 0
finally:
    if miner is not None:
        miner.stop()
    mock.stop()
    say(f"files kept in {work}")
sys.exit(status)
PY
