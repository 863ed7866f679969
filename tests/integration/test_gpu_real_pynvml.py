"""The GPU code over the REAL pynvml bindings, with a fake C NVML as the driver's library.

Every other GPU test replaces the pynvml module with the pure-Python fake
(tests/support/fake_nvml.py), so pynvml's ctypes layer never runs there. Here
pynvml itself calls into `tests/support/nvml_shim/fake_nvml.c` built as
libnvidia-ml.so.1: the symbols it resolves (nvmlDeviceGetCount_v2,
nvmlDeviceGetPciInfo_v3, nvmlDeviceGetComputeRunningProcesses_v3, ...), the
struct layouts, NVML return codes turned into NVMLError_* classes, and the
bytes/str decoding all go through ctypes for real. Nothing in pynvml is patched:
in-process tests only hand pynvml the shim as its loaded library (module state
restored afterwards); the subprocess tests load it through pynvml's own
`CDLL("libnvidia-ml.so.1")` via LD_LIBRARY_PATH. The shim's legacy build plays a
pre-R510 driver (R470): no nvmlDeviceGetComputeRunningProcesses_v3, only ..._v2.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pynvml
import pytest

from aitbc_miner import gpu, probe
from aitbc_miner.gpu import (
    TOPO_SINGLE,
    TOPO_SYSTEM,
    GpuInventory,
    GpuProcess,
    NoGpuFree,
    choose_gpus,
    device_slots_free,
    vram_offers,
)
from aitbc_miner.gpu_sweep import JobMark, read_facts, sweep
from aitbc_miner.metrics import Metrics
from tests.support import fake_nvml, nvml_shim
from tests.support.fake_nvml import FakeNvml
from tests.support.jobs import sh_job, wait_final
from tests.support.minerproc import REPO
from tests.support.procs import fake_job_processes
from tests.support.wait import wait_for

MIB = 1024 * 1024
V3 = "nvmlDeviceGetComputeRunningProcesses_v3"
V2 = "nvmlDeviceGetComputeRunningProcesses_v2"


def _build(factory: pytest.TempPathFactory, *, legacy: bool) -> Path:
    if nvml_shim.compiler() is None:
        pytest.skip("no C compiler (cc, gcc or clang) to build the fake libnvidia-ml.so.1")
    return nvml_shim.build(factory.getbasetemp() / "nvml-shim", legacy=legacy)


@pytest.fixture(scope="session")
def shim_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, legacy=False)


@pytest.fixture(scope="session")
def legacy_shim_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim as a pre-R510 driver's library: ..._v2 but no ..._v3."""
    return _build(tmp_path_factory, legacy=True)


class _Library(ctypes.CDLL):
    """A CDLL noting each symbol lookup that reaches the library.

    ctypes caches a symbol it found, so a found one is looked up once; a missing
    one (pynvml: NVMLError_FunctionNotFound) is looked up on every attempt. The
    shim's trace cannot show those: a call to a missing symbol never reaches it.
    """

    def __init__(self, path: str) -> None:
        self.lookups: list[str] = []
        super().__init__(path)

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("__"):
            self.lookups.append(name)
        return super().__getattr__(name)


@dataclass
class Shim:
    lib: Path
    config: Path
    trace: Path
    loaded: _Library

    def set(self, scenario: dict[str, Any] | str) -> None:
        nvml_shim.write_config(self.config, scenario)

    def calls(self) -> list[str]:
        return self.trace.read_text().split() if self.trace.exists() else []


def _install(lib_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Shim:
    """The real pynvml in this process, its library being the shim at `lib_path`."""
    lib = _Library(str(lib_path))  # the same loaded library every time: reset its state
    lib.aitbcFakeNvmlReset()
    s = Shim(lib_path, tmp_path / "nvml.conf", tmp_path / "nvml.trace", lib)
    monkeypatch.setenv(nvml_shim.CONFIG_ENV, str(s.config))
    monkeypatch.setenv(nvml_shim.TRACE_ENV, str(s.trace))
    # What pynvml._LoadNvmlLibrary() stores after CDLL("libnvidia-ml.so.1"); that load
    # itself runs in the subprocess tests. Restored after the test.
    monkeypatch.setattr(pynvml, "nvmlLib", lib)
    monkeypatch.setattr(pynvml, "_nvmlLib_refcount", 0)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {})
    return s


@pytest.fixture
def shim(shim_lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Shim:
    """The real pynvml in this process over an R510+ driver's library."""
    return _install(shim_lib, tmp_path, monkeypatch)


@pytest.fixture
def legacy_shim(legacy_shim_lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Shim:
    """The real pynvml in this process over a pre-R510 (R470) driver's library."""
    return _install(legacy_shim_lib, tmp_path, monkeypatch)


def uuids(scenario: dict[str, Any]) -> list[str]:
    return [g["uuid"] for g in scenario["gpus"]]


def mixed() -> dict[str, Any]:
    """fake_nvml.four_mixed() with a newer driver and a PCI address with hex letters."""
    scenario = fake_nvml.four_mixed()
    scenario.update(driver="570.124.06", cuda=12080)
    scenario["gpus"][3]["pci"] = "00000001:C1:1F.0"
    return scenario


# -- the inventory -----------------------------------------------------------------------


def test_four_gpus_every_field_comes_through_the_real_bindings(shim):
    scenario = mixed()
    shim.set(scenario)
    inv = GpuInventory()  # nvml=None: `import pynvml`, the real module
    gpus = inv.snapshot()
    assert inv.active and inv.reason == ""
    u = uuids(scenario)
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert [g.uuid for g in gpus] == u  # str, not bytes
    assert [g.name for g in gpus] == [
        "NVIDIA GeForce RTX 4090",
        "NVIDIA H100 80GB HBM3",
        "NVIDIA RTX A4000",
        "NVIDIA L40S",
    ]
    assert [g.pci_bus_id for g in gpus] == [
        "00000000:01:00.0",
        "00000000:02:00.0",
        "00000000:03:00.0",
        "00000001:C1:1F.0",  # nvmlPciInfo_t.busId (v3 layout), not busIdLegacy
    ]
    assert [(g.vram_mb, g.vram_free_mb, g.vram_used_mb) for g in gpus] == [
        (24576, 4096, 20480),
        (81920, 71680, 10240),
        (16384, 15360, 1024),
        (49152, 40960, 8192),
    ]
    assert [g.util_pct for g in gpus] == [90, 0, 0, 0]
    assert [g.temperature_c for g in gpus] == [40, 41, 42, 43]
    assert [g.numa_node for g in gpus] == [0, 0, 1, 1]
    assert {(g.driver, g.cuda) for g in gpus} == {("570.124.06", "12.8")}
    assert all(g.available and g.schedulable and not g.mig for g in gpus)
    assert all(g.processes == () and g.reason == "" for g in gpus)
    assert dict(gpus[0].links) == {u[1]: TOPO_SINGLE, u[2]: TOPO_SYSTEM, u[3]: TOPO_SYSTEM}
    assert dict(gpus[3].links) == {u[0]: TOPO_SYSTEM, u[1]: TOPO_SYSTEM, u[2]: TOPO_SINGLE}


def test_descriptor_heartbeat_and_metrics_figures_from_real_readings(shim, tmp_path):
    scenario = mixed()
    shim.set(scenario)
    gpus = GpuInventory().snapshot()
    desc = probe.descriptor(
        node_id="n1",
        gpus=gpus,
        runners=["cli"],
        slots={"cpu": 1, "gpu": 4},
        workspace_root=str(tmp_path),
    )
    assert "cuda" in desc["tags"]
    assert desc["gpu"][3] == {
        "index": 3,
        "uuid": uuids(scenario)[3],
        "vendor": "nvidia",
        "name": "NVIDIA L40S",
        "vram_mb": 49152,
        "pci_bus_id": "00000001:C1:1F.0",
        "numa_node": 1,
        "mig": False,
        "cuda": {"version": "12.8", "driver": "570.124.06"},
    }
    json.dumps(desc)  # every value is plain JSON (no bytes, no ctypes)
    assert gpus[0].free_entry() == {
        "index": 0,
        "uuid": uuids(scenario)[0],
        "vram_free_mb": 4096,
        "util_pct": 90,
        "temperature_c": 40,
    }
    metrics = Metrics()
    metrics.export_gpus(gpus)
    labels = {"index": "1", "uuid": uuids(scenario)[1]}
    value = metrics.registry.get_sample_value
    assert value("aitbc_miner_gpu_memory_total_bytes", labels) == 81920 * MIB
    assert value("aitbc_miner_gpu_memory_free_bytes", labels) == 71680 * MIB
    assert value("aitbc_miner_gpu_memory_used_bytes", labels) == 10240 * MIB
    assert value("aitbc_miner_gpu_temperature_celsius", labels) == 41
    assert value("aitbc_miner_gpu_available", labels) == 1


def test_gpu_choice_over_real_readings(shim):
    scenario = mixed()
    shim.set(scenario)
    gpus = GpuInventory().snapshot()
    # free MiB: 4096, 71680, 15360, 40960; 0+1 and 2+3 share a PCIe switch
    assert vram_offers(gpus, {}, 1, {}) == [4096, 71680, 15360, 40960]
    assert device_slots_free(gpus, {}, 2) == 8

    def pick(**kw: Any) -> list[int]:
        kw.setdefault("in_use", {})
        kw.setdefault("jobs_per_gpu", 1)
        return [g.index for g in choose_gpus(gpus, **kw)]

    assert pick(count=1, vram_mb=10000) == [1]
    assert pick(count=2, vram_mb=10000) == [2, 3]  # the only fitting pair on one switch
    assert pick(count=2, vram_mb=3000) == [0, 1]  # both pairs close: the most free wins
    assert pick(count=1, vram_mb=10000, in_use={uuids(scenario)[1]: 1}) == [3]
    with pytest.raises(NoGpuFree):
        pick(count=1, vram_mb=100_000)


def test_same_readings_as_the_python_fake_for_every_shared_scenario(shim):
    """The Python fake that the other GPU tests use is faithful to pynvml + a driver."""
    lost = fake_nvml.four_mixed()
    lost["gpus"][2]["error"] = "gpu_lost"
    mig = fake_nvml.one_gpu()
    mig["gpus"][0]["mig"] = True
    failing = fake_nvml.four_mixed()
    failing["system_error"] = "unknown"
    scenarios = [
        fake_nvml.one_gpu(),
        mixed(),
        fake_nvml.busy_foreign(pid=4242),
        lost,
        mig,
        failing,
        fake_nvml.no_gpu(),  # nvmlInit: NVMLError_LibraryNotFound
        {"init_error": "driver_not_loaded", "gpus": []},
        {"gpus": []},
    ]
    for scenario in scenarios:
        shim.set(scenario)
        real, fake = GpuInventory(), GpuInventory(FakeNvml(scenario))
        assert real.snapshot() == fake.snapshot(), scenario
        assert (real.reason, real.active) == (fake.reason, fake.active), scenario


def test_nvml_calls_go_to_the_versioned_symbols_and_topology_is_asked_once(shim):
    shim.set(mixed())
    inv = GpuInventory()
    inv.snapshot()
    first = shim.calls()
    assert first[0] == "nvmlInitWithFlags"  # pynvml.nvmlInit -> nvmlInitWithFlags(0)
    assert {
        "nvmlDeviceGetCount_v2",
        "nvmlDeviceGetHandleByIndex_v2",
        "nvmlDeviceGetPciInfo_v3",
        V3,
        "nvmlDeviceGetMemoryInfo",
    } <= set(first)
    assert V2 not in first and V2 not in shim.loaded.lookups  # the driver has _v3: no fallback
    assert first.count("nvmlDeviceGetTopologyCommonAncestor") == 6  # 4 GPUs: 6 pairs
    inv.snapshot()
    again = shim.calls()[len(first) :]
    assert "nvmlInitWithFlags" not in again
    assert "nvmlDeviceGetTopologyCommonAncestor" not in again


# -- CPU-only nodes, MIG, foreign processes, failing GPUs ---------------------------------


def test_no_driver_and_no_gpu_are_cpu_only_nodes(shim):
    shim.set({"init_error": "driver_not_loaded", "gpus": []})
    inv = GpuInventory()
    assert inv.snapshot() == [] and inv.snapshot() == []
    assert inv.reason == "NVMLError_DriverNotLoaded: Driver Not Loaded"
    assert not inv.active
    assert shim.calls().count("nvmlInitWithFlags") == 1  # tried once, not per heartbeat
    assert inv.compute_processes("GPU-any") is None

    shim.set({"gpus": []})
    inv = GpuInventory()
    assert inv.snapshot() == []
    assert inv.active and inv.reason == ""


def test_mig_mode_is_read_from_the_current_mode(shim):
    scenario = {
        "gpus": [
            fake_nvml.gpu(0, 81920, 0, name="NVIDIA A100-SXM4-80GB", mig=True, mig_pending=False),
            fake_nvml.gpu(1, 81920, 0, name="NVIDIA A100-SXM4-80GB", mig=False, mig_pending=True),
            fake_nvml.gpu(2, 24576, 0, name="NVIDIA GeForce RTX 4090", mig=None),  # no MIG
        ]
    }
    shim.set(scenario)
    gpus = GpuInventory().snapshot()
    assert [g.mig for g in gpus] == [True, False, False]
    assert [g.schedulable for g in gpus] == [False, True, True]
    assert all(g.available for g in gpus)
    assert [g.name for g in gpus[:2]] == ["NVIDIA A100-SXM4-80GB"] * 2
    desc = probe.descriptor(node_id="n1", gpus=gpus, runners=[], slots={}, workspace_root="/")
    assert [g["index"] for g in desc["gpu"]] == [1, 2]
    # GPU 0 has the most free VRAM, but MIG mode runs no CUDA work on the whole GPU
    chosen = choose_gpus(gpus, count=1, vram_mb=1000, in_use={}, jobs_per_gpu=1)
    assert [g.index for g in chosen] == [1]


def test_mig_gpu_stays_listed_when_nvml_keeps_its_processes_from_an_unprivileged_daemon(shim):
    # NVML: on a MIG-mode GPU the device handle's process list is "aggregate
    # information, only if the caller has appropriate privileges"; the daemon runs
    # as User=aitbc-miner without capabilities (systemd/aitbc-miner.service).
    scenario = {
        "gpus": [
            fake_nvml.gpu(0, 81920, 0, name="NVIDIA A100-SXM4-80GB", mig=True),
            fake_nvml.gpu(1, 24576, 0, name="NVIDIA GeForce RTX 4090"),
        ]
    }
    for spec in scenario["gpus"]:
        spec["processes_error"] = "no_permission"
    shim.set(scenario)
    g0, g1 = GpuInventory().snapshot()
    assert (g0.uuid, g0.name, g0.vram_mb, g0.vram_free_mb) == (
        uuids(scenario)[0],
        "NVIDIA A100-SXM4-80GB",
        81920,
        81920,
    )
    assert g0.available and g0.mig and not g0.schedulable and g0.reason == ""
    assert g0.processes == ()  # unknown: no job runs on the whole MIG-mode GPU anyway
    # Off MIG the policy and the sweep need the list: failing to read it is a failure.
    assert not g1.available
    assert g1.reason == "NVMLError_NoPermission: Insufficient Permissions"


def test_foreign_compute_processes_and_their_memory(shim):
    scenario = fake_nvml.busy_foreign(pid=4242, used_mb=20000)
    scenario["gpus"][0]["processes"].append({"pid": 4243, "used_mb": 512, "sticky": True})
    # NVML_VALUE_NOT_AVAILABLE for usedGpuMemory (pynvml turns it into None)
    scenario["gpus"][1]["processes"] = [{"pid": 5151, "used_mb": None, "sticky": True}]
    shim.set(scenario)
    inv = GpuInventory()
    g0, g1 = inv.snapshot()
    assert g0.available and g1.available
    assert g0.processes == (GpuProcess(4242, 20000), GpuProcess(4243, 512))
    assert (g0.vram_free_mb, g0.vram_used_mb) == (24576 - 20512, 20512)
    assert g1.processes == (GpuProcess(5151, 0),)
    assert (g1.vram_free_mb, g1.vram_used_mb) == (24576, 0)
    u = uuids(scenario)
    assert inv.compute_processes(u[0]) == [GpuProcess(4242, 20000), GpuProcess(4243, 512)]
    assert inv.compute_processes(u[1]) == [GpuProcess(5151, 0)]
    assert inv.compute_processes("GPU-nope") is None  # NVMLError_NotFound, logged
    chosen = choose_gpus([g0, g1], count=1, vram_mb=8000, in_use={}, jobs_per_gpu=1)
    assert [g.index for g in chosen] == [1]  # the foreign process only costs its VRAM


def test_lost_gpu_is_marked_unavailable_and_comes_back_without_raising(shim):
    scenario = mixed()
    u = uuids(scenario)
    scenario["gpus"][2]["error"] = "gpu_lost"  # off the bus from the start: no handle
    shim.set(scenario)
    inv = GpuInventory()
    gpus = inv.snapshot()
    assert [g.available for g in gpus] == [True, True, False, True]
    assert gpus[2].uuid == "unavailable-2" and gpus[2].vram_free_mb == 0
    assert gpus[2].reason == "NVMLError_GpuIsLost: GPU is lost"
    assert [
        g.index for g in choose_gpus(gpus, count=2, vram_mb=10000, in_use={}, jobs_per_gpu=1)
    ] == [1, 3]
    assert vram_offers(gpus, {}, 1, {}) == [4096, 71680, 40960]

    scenario["gpus"][2]["error"] = None  # back
    shim.set(scenario)
    before = inv.snapshot()
    assert all(g.available for g in before) and before[2].uuid == u[2]

    # Lost mid-run while the handle still resolves: every query fails.
    scenario["gpus"][2]["query_error"] = "gpu_lost"
    shim.set(scenario)
    during = inv.snapshot()
    lost = during[2]
    assert [g.available for g in during] == [True, True, False, True]
    assert (lost.uuid, lost.name, lost.vram_mb) == (u[2], "NVIDIA RTX A4000", 16384)
    assert (lost.vram_free_mb, lost.processes) == (0, ())
    assert lost.reason == "NVMLError_GpuIsLost: GPU is lost"
    assert inv.compute_processes(u[2]) is None

    # Lost so badly the handle lookup fails too: identity kept by index.
    scenario["gpus"][2].pop("query_error")
    scenario["gpus"][2]["error"] = "gpu_lost"
    shim.set(scenario)
    lost = inv.snapshot()[2]
    assert (lost.available, lost.uuid, lost.name) == (False, u[2], "NVIDIA RTX A4000")

    # NVML failing as a whole: every known device listed, unavailable.
    scenario["gpus"][2]["error"] = None
    scenario["system_error"] = "unknown"
    shim.set(scenario)
    down = inv.snapshot()
    assert sorted(g.uuid for g in down) == u and not any(g.available for g in down)
    assert {g.reason for g in down} == {"NVML: NVMLError_Unknown: Unknown Error"}
    assert inv.active

    scenario["system_error"] = None
    shim.set(scenario)
    after = inv.snapshot()
    assert all(g.available for g in after)
    assert [g.vram_free_mb for g in after] == [g.vram_free_mb for g in before]


# -- a pre-R510 driver (R470): no nvmlDeviceGetComputeRunningProcesses_v3 --------------------


class _Log:
    """Stands in for aitbc_miner.gpu's structlog logger: records (event, fields)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    debug = info = warning = error = _record


def r470(scenario: dict[str, Any]) -> dict[str, Any]:
    scenario.update(driver="470.256.02", cuda=11040)
    return scenario


def test_pre_r510_driver_lists_gpus_and_foreign_processes_through_v2(legacy_shim, monkeypatch):
    scenario = r470(fake_nvml.busy_foreign(pid=4242, used_mb=20000))
    scenario["gpus"][0]["processes"].append({"pid": 4243, "used_mb": 512, "sticky": True})
    scenario["gpus"][1]["processes"] = [{"pid": 5151, "used_mb": None, "sticky": True}]
    legacy_shim.set(scenario)
    pynvml.nvmlInit()
    try:  # what pynvml's unversioned call does on such a driver
        with pytest.raises(pynvml.NVMLLibraryMismatchError):
            pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0))
    finally:
        pynvml.nvmlShutdown()
    legacy_shim.loaded.lookups.clear()

    log = _Log()
    monkeypatch.setattr(gpu, "log", log)
    inv = GpuInventory()
    g0, g1 = inv.snapshot()
    assert g0.available and g1.available and g0.reason == g1.reason == ""
    assert (g0.driver, g0.cuda) == ("470.256.02", "11.4")
    assert g0.processes == (GpuProcess(4242, 20000), GpuProcess(4243, 512))
    assert (g0.vram_free_mb, g0.vram_used_mb) == (24576 - 20512, 20512)
    assert g1.processes == (GpuProcess(5151, 0),)  # NVML_VALUE_NOT_AVAILABLE
    u = uuids(scenario)
    assert inv.compute_processes(u[0]) == [GpuProcess(4242, 20000), GpuProcess(4243, 512)]
    assert inv.compute_processes(u[1]) == [GpuProcess(5151, 0)]
    assert inv.compute_processes("GPU-nope") is None  # NVMLError_NotFound, as before
    assert all(g.available for g in inv.snapshot())

    # _v3 was looked for once, not per device or per heartbeat; _v2 did the listing.
    assert legacy_shim.loaded.lookups.count(V3) == 1
    calls = legacy_shim.calls()
    assert V3 not in calls and calls.count(V2) >= 6  # 2 snapshots x 2 GPUs + 2 sweeps
    legacy = [kw for event, kw in log.events if event == "gpu_processes_legacy_call"]
    assert legacy == [
        {"call": V2, "missing": V3, "error": "NVMLLibraryMismatchError"},
    ]
    assert not [event for event, _ in log.events if event == "gpu_marked_unavailable"]
    # as the Python fake (which knows no unavailable usedGpuMemory) reads GPU 0
    assert g0 == GpuInventory(FakeNvml(scenario)).snapshot()[0]


def test_pre_r510_driver_keeps_the_mig_rule_and_real_errors(legacy_shim):
    scenario = r470(
        {
            "gpus": [
                fake_nvml.gpu(0, 81920, 0, name="NVIDIA A100-SXM4-80GB", mig=True),
                fake_nvml.gpu(1, 24576, 0, name="NVIDIA GeForce RTX 3090"),
            ]
        }
    )
    for spec in scenario["gpus"]:
        spec["processes_error"] = "no_permission"  # _v2 itself answers NoPermission
    legacy_shim.set(scenario)
    inv = GpuInventory()
    g0, g1 = inv.snapshot()
    assert g0.available and g0.mig and g0.processes == ()  # MIG: unknown, not a failure
    assert not g1.available  # off MIG a listing failure is the device's, as with _v3
    assert g1.reason == "NVMLError_NoPermission: Insufficient Permissions"
    assert inv.compute_processes(g1.uuid) is None

    scenario["gpus"][1].pop("processes_error")
    legacy_shim.set(scenario)
    assert inv.snapshot()[1].available
    assert legacy_shim.loaded.lookups.count(V3) == 1


async def test_sweep_on_a_pre_r510_driver_kills_the_jobs_process(legacy_shim, spawn):
    ours, stranger = spawn("job-1"), spawn("job-2")
    scenario = r470(fake_nvml.one_gpu())
    scenario["gpus"][0]["processes"] = [
        {"pid": ours.pid, "used_mb": 700},
        {"pid": stranger.pid, "used_mb": 300},
    ]
    legacy_shim.set(scenario)
    inv = GpuInventory()
    uuid = uuids(scenario)[0]
    # The sweep's own listing (compute_processes) is the first to meet the missing _v3.
    report = await sweep(inv, [uuid], JobMark("job-1", 1), grace_s=10, poll_s=0.05)
    assert report.killed == [(uuid, ours.pid, "env")] and report.quarantined == []
    assert ours.wait(timeout=5) == -9 and stranger.poll() is None
    (g,) = inv.snapshot()
    assert g.available and g.processes == (GpuProcess(stranger.pid, 300),)
    assert legacy_shim.loaded.lookups.count(V3) == 1


# -- the post-job sweep ----------------------------------------------------------------------


@pytest.fixture
def spawn() -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    with fake_job_processes() as start_process:

        def start(job_id: str) -> subprocess.Popen[bytes]:
            proc = start_process(job_id)
            deadline = time.monotonic() + 5  # its environ is the parent's until exec
            while (facts := read_facts(proc.pid)) is None or facts.env_job_id != job_id:
                assert time.monotonic() < deadline, "child never showed its environment"
                time.sleep(0.01)
            return proc

        yield start


async def test_sweep_kills_the_jobs_process_nvml_lists_and_spares_a_stranger(shim, spawn):
    ours, stranger = spawn("job-1"), spawn("job-2")
    scenario = fake_nvml.one_gpu()  # listed while alive: the driver frees memory at exit
    scenario["gpus"][0]["processes"] = [
        {"pid": ours.pid, "used_mb": 700},
        {"pid": stranger.pid, "used_mb": 300},
    ]
    shim.set(scenario)
    inv = GpuInventory()
    (g,) = inv.snapshot()
    assert g.processes == (GpuProcess(ours.pid, 700), GpuProcess(stranger.pid, 300))
    metrics = Metrics()
    report = await sweep(
        inv, [g.uuid], JobMark("job-1", 1), grace_s=10, poll_s=0.05, metrics=metrics
    )
    assert report.killed == [(g.uuid, ours.pid, "env")] and report.quarantined == []
    assert ours.wait(timeout=5) == -9 and stranger.poll() is None
    assert metrics.registry.get_sample_value("aitbc_miner_gpu_sweep_kills_total") == 1
    (g,) = inv.snapshot()
    assert g.available and g.processes == (GpuProcess(stranger.pid, 300),)


async def test_memory_nvml_keeps_listing_quarantines_the_gpu_until_released(shim, spawn):
    ours = spawn("job-1")
    scenario = fake_nvml.one_gpu()  # sticky: listed even after the process died
    scenario["gpus"][0]["processes"] = [{"pid": ours.pid, "used_mb": 900, "sticky": True}]
    shim.set(scenario)
    inv = GpuInventory()
    uuid = inv.snapshot()[0].uuid
    report = await sweep(inv, [uuid], JobMark("job-1", 1), grace_s=0.3, poll_s=0.05)
    assert report.killed == [(uuid, ours.pid, "env")] and report.quarantined == [uuid]
    assert ours.wait(timeout=5) == -9
    g = inv.snapshot()[0]
    assert not g.available and g.reason == f"leftover job processes hold memory: [{ours.pid}]"
    scenario["gpus"][0]["processes"] = []  # the driver lets go at last
    shim.set(scenario)
    assert inv.snapshot()[0].available and inv.quarantined == {}


# -- real processes: pynvml finds the shim as libnvidia-ml.so.1 itself -----------------------


def run_probe(shim_lib: Path, tmp_path: Path, scenario: dict[str, Any]) -> dict[str, Any]:
    config = tmp_path / "probe-nvml.conf"
    nvml_shim.write_config(config, scenario)
    env = nvml_shim.env(shim_lib, config)
    env = {k: v for k, v in env.items() if not k.startswith("AITBC_MINER_")}
    env["AITBC_MINER_WORKSPACE__ROOT"] = str(tmp_path / "ws")
    result = subprocess.run(
        [sys.executable, "-m", "aitbc_miner", "probe"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_probe_command_loads_the_library_by_soname(shim_lib, tmp_path):
    scenario = mixed()
    scenario["gpus"][1]["error"] = "gpu_lost"
    scenario["gpus"][2]["mig"] = True
    desc = run_probe(shim_lib, tmp_path, scenario)
    u = uuids(scenario)
    assert [(g["index"], g["uuid"], g["vram_mb"]) for g in desc["gpu"]] == [
        (0, u[0], 24576),
        (3, u[3], 49152),
    ]
    assert desc["gpu"][1]["pci_bus_id"] == "00000001:C1:1F.0"
    assert desc["gpu"][1]["cuda"] == {"version": "12.8", "driver": "570.124.06"}
    assert "cuda" in desc["tags"] and desc["slots"]["gpu"] >= 1

    desc = run_probe(shim_lib, tmp_path, {"init_error": "driver_not_loaded", "gpus": []})
    assert desc["gpu"] == [] and "cuda" not in desc["tags"] and desc["slots"]["gpu"] == 0


def test_probe_on_a_pre_r510_driver_lists_its_gpus(legacy_shim_lib, tmp_path):
    scenario = r470(mixed())
    scenario["gpus"][0]["processes"] = [{"pid": 4242, "used_mb": 2048, "sticky": True}]
    desc = run_probe(legacy_shim_lib, tmp_path, scenario)
    assert [g["uuid"] for g in desc["gpu"]] == uuids(scenario)
    assert desc["gpu"][0]["cuda"] == {"version": "11.4", "driver": "470.256.02"}
    assert "cuda" in desc["tags"] and desc["slots"]["gpu"] >= 1


def test_miner_runs_a_gpu_job_on_the_shims_gpu_and_follows_it_failing(
    shim_lib, tmp_path, mock, miner_factory
):
    scenario = mixed()
    u = uuids(scenario)
    scenario["gpus"][1]["query_error"] = "gpu_lost"  # the emptiest GPU is failing
    config = tmp_path / "miner-nvml.conf"
    nvml_shim.write_config(config, scenario)
    env = nvml_shim.env(shim_lib, config, base={})
    miner = miner_factory(
        mock,
        **env,
        AITBC_MINER_RESOURCES__MAX_CONCURRENT_GPU="1",
        AITBC_MINER_COORDINATOR__PULL_WAIT_S="0.5",
    )
    node = mock.admin.node("node-test")
    assert [g["uuid"] for g in node["descriptor"]["gpu"]] == [u[0], u[2], u[3]]
    script = 'echo "$CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER" > out.txt'
    req = {"gpu": True, "vram_mb": 10000}
    out = [{"path": "out.txt"}]
    mock.admin.enqueue(sh_job("gpu-1", script, requirements=req, artifacts=out), retry=False)
    job = wait_final(mock, "gpu-1")
    assert job["state"] == "succeeded", job
    assert mock.admin.artifact("gpu-1", "out.txt").decode().split() == [u[3], "PCI_BUS_ID"]
    assert job["result"]["usage"]["gpu"] == [3]
    metrics = httpx.get(f"{miner.health_url}/metrics").text
    assert f'aitbc_miner_gpu_available{{index="1",uuid="{u[1]}"}} 0.0' in metrics
    assert f'aitbc_miner_gpu_available{{index="3",uuid="{u[3]}"}} 1.0' in metrics

    scenario["gpus"][1].pop("query_error")  # GPU 1 answers again: the next job gets it
    nvml_shim.write_config(config, scenario)

    def heartbeat_free() -> dict[int, int]:
        body = mock.admin.node("node-test")["heartbeats"][-1]["body"]
        return {g["index"]: g["vram_free_mb"] for g in body["gpu_free"]}

    wait_for(
        lambda: heartbeat_free() == {0: 4096, 1: 71680, 2: 15360, 3: 40960},
        timeout=10,
        what="GPU 1 back in the heartbeats",
    )
    miner.wait_event("gpu_available_again", uuid=u[1])
    mock.admin.enqueue(sh_job("gpu-2", script, requirements=req, artifacts=out), retry=False)
    job = wait_final(mock, "gpu-2")
    assert job["state"] == "succeeded", job
    assert mock.admin.artifact("gpu-2", "out.txt").decode().split() == [u[1], "PCI_BUS_ID"]
    assert miner.proc.poll() is None
