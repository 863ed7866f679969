"""GpuInventory over the fake NVML: CPU-only nodes, readings, failures and recovery."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pynvml
import pytest

from aitbc_miner import gpu as gpu_module
from aitbc_miner.gpu import GpuInventory
from aitbc_miner.metrics import Metrics
from tests.support import fake_nvml
from tests.support.fake_nvml import FakeNvml

GPU_SOURCE = Path(gpu_module.__file__).read_text()


def test_fake_offers_every_nvml_name_the_inventory_uses_and_pynvml_has_them_too():
    used = set(re.findall(r"nvml\.(nvml\w+|NVML_\w+)", GPU_SOURCE))
    used |= set(re.findall(r'getattr\(nvml, "(\w+)"', GPU_SOURCE))
    assert {"nvmlInit", "nvmlDeviceGetComputeRunningProcesses"} <= used
    for name in used:
        assert hasattr(FakeNvml, name), f"fake NVML lacks {name}"
        assert hasattr(pynvml, name), f"pynvml has no {name}"
    for name, member in inspect.getmembers(FakeNvml):
        if name.startswith(("nvml", "NVML")):
            assert hasattr(pynvml, name), f"fake has {name}, pynvml does not"
            if name.startswith("NVML_"):
                assert getattr(pynvml, name) == member, name


def test_fake_errors_mirror_pynvml_classes():
    err = fake_nvml.NVMLError(fake_nvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    assert type(err).__name__ == "NVMLError_LibraryNotFound"
    assert isinstance(err, fake_nvml.NVMLError)
    assert fake_nvml.NVMLError_GpuIsLost.__name__ in dir(pynvml)


def test_no_driver_is_a_cpu_only_node():
    fake = FakeNvml(fake_nvml.no_gpu())
    inv = GpuInventory(fake)
    assert inv.snapshot() == []
    assert inv.snapshot() == []
    assert "LibraryNotFound" in inv.reason
    assert not inv.active
    assert fake.calls.count("nvmlInit") == 1  # tried once, not on every heartbeat


def test_disabled_by_config_never_touches_nvml():
    fake = FakeNvml(fake_nvml.one_gpu())
    inv = GpuInventory(fake, enabled=False)
    assert inv.snapshot() == []
    assert fake.calls == []
    assert inv.reason == "gpu.enable is false"


def test_one_gpu_reading():
    (g,) = GpuInventory(FakeNvml(fake_nvml.one_gpu())).snapshot()
    assert g.index == 0 and g.uuid.startswith("GPU-")
    assert g.name == "NVIDIA GeForce RTX 4060 Ti"
    assert (g.vram_mb, g.vram_free_mb, g.vram_used_mb) == (16384, 15872, 512)
    assert g.pci_bus_id == "00000000:01:00.0"  # bytes from NVML, text here
    assert g.temperature_c == 40
    assert (g.driver, g.cuda) == ("550.54.15", "12.4")
    assert g.available and g.schedulable and not g.mig
    assert g.numa_node is None  # NOT_SUPPORTED is "unknown", not a failure
    desc = g.descriptor()
    assert desc["vendor"] == "nvidia" and desc["vram_mb"] == 16384
    assert desc["cuda"] == {"version": "12.4", "driver": "550.54.15"}
    assert g.free_entry()["vram_free_mb"] == 15872


def test_four_mixed_gpus_with_topology():
    gpus = GpuInventory(FakeNvml(fake_nvml.four_mixed())).snapshot()
    assert [g.index for g in gpus] == [0, 1, 2, 3]
    assert [g.vram_free_mb for g in gpus] == [4096, 71680, 15360, 40960]
    assert gpus[0].util_pct == 90
    assert dict(gpus[0].links)[gpus[1].uuid] == fake_nvml.NVML_TOPOLOGY_SINGLE
    assert [g.numa_node for g in gpus] == [0, 0, 1, 1]


def test_topology_is_asked_once_per_pair():
    fake = FakeNvml(fake_nvml.four_mixed())
    inv = GpuInventory(fake)
    inv.snapshot()
    first = fake.calls.count("nvmlDeviceGetTopologyCommonAncestor")
    inv.snapshot()
    assert fake.calls.count("nvmlDeviceGetTopologyCommonAncestor") == first


def test_busy_foreign_process_is_reported_not_fatal():
    gpus = GpuInventory(FakeNvml(fake_nvml.busy_foreign(pid=4242))).snapshot()
    assert gpus[0].available and gpus[0].processes[0].pid == 4242
    assert gpus[0].vram_free_mb == 24576 - 20000


def test_gpu_erroring_mid_run_is_marked_unavailable_then_comes_back():
    fake = FakeNvml(fake_nvml.four_mixed())
    inv = GpuInventory(fake)
    before = inv.snapshot()
    fake.set_gpu(2, error="gpu_lost")
    during = inv.snapshot()
    assert [g.available for g in during] == [True, True, False, True]
    lost = during[2]
    assert lost.uuid == before[2].uuid and lost.name == before[2].name  # identity kept
    assert lost.vram_free_mb == 0 and "GpuIsLost" in lost.reason
    fake.set_gpu(2, error=None)
    after = inv.snapshot()
    assert all(g.available for g in after)
    assert after[2].vram_free_mb == before[2].vram_free_mb


def test_nvml_failing_as_a_whole_keeps_the_devices_listed_as_unavailable():
    fake = FakeNvml(fake_nvml.four_mixed())
    inv = GpuInventory(fake)
    inv.snapshot()
    fake.set(system_error="unknown")
    down = inv.snapshot()
    assert len(down) == 4 and not any(g.available for g in down)
    assert inv.active  # the heartbeat loop keeps asking
    fake.set(system_error=None)
    assert all(g.available for g in inv.snapshot())


def test_device_vanishing_from_nvml_stays_listed_as_unavailable():
    fake = FakeNvml(fake_nvml.four_mixed())
    inv = GpuInventory(fake)
    uuids = [g.uuid for g in inv.snapshot()]
    del fake.scenario["gpus"][3]
    gpus = {g.uuid: g for g in inv.snapshot()}
    assert set(gpus) == set(uuids)
    assert not gpus[uuids[3]].available and "no longer listed" in gpus[uuids[3]].reason


def test_mig_mode_gpu_is_listed_but_not_schedulable():
    scenario = fake_nvml.one_gpu()
    scenario["gpus"][0]["mig"] = True
    (g,) = GpuInventory(FakeNvml(scenario)).snapshot()
    assert g.available and g.mig and not g.schedulable
    assert g.descriptor()["mig"] is True


def test_quarantine_holds_until_nvml_stops_listing_the_pids():
    scenario = fake_nvml.busy_foreign(pid=4242)
    fake = FakeNvml(scenario)
    inv = GpuInventory(fake)
    u = inv.snapshot()[0].uuid
    inv.quarantine(u, [4242])
    g = inv.snapshot()[0]
    assert not g.available and "4242" in g.reason
    fake.set_gpu(0, processes=[])
    assert inv.snapshot()[0].available
    assert inv.quarantined == {}


def test_compute_processes_by_uuid_and_on_error():
    fake = FakeNvml(fake_nvml.busy_foreign(pid=4242, used_mb=300))
    inv = GpuInventory(fake)
    gpus = inv.snapshot()
    assert [(p.pid, p.used_mb) for p in inv.compute_processes(gpus[0].uuid)] == [(4242, 300)]
    assert inv.compute_processes(gpus[1].uuid) == []
    fake.set_gpu(0, error="gpu_lost")
    assert inv.compute_processes(gpus[0].uuid) is None
    assert inv.compute_processes("GPU-nope") is None


def test_file_backed_fake_follows_the_scenario_file(tmp_path):
    path = tmp_path / "nvml.json"
    fake_nvml.write_scenario(path, fake_nvml.one_gpu())
    inv = GpuInventory(FakeNvml.from_file(path))
    assert inv.snapshot()[0].available
    scenario = fake_nvml.one_gpu()
    scenario["gpus"][0]["error"] = "unknown"
    fake_nvml.write_scenario(path, scenario)
    assert not inv.snapshot()[0].available


def test_gpu_metrics_export():
    gpus = GpuInventory(FakeNvml(fake_nvml.four_mixed())).snapshot()
    metrics = Metrics()
    metrics.export_gpus(gpus)
    value = metrics.registry.get_sample_value
    labels = {"index": "1", "uuid": gpus[1].uuid}
    assert value("aitbc_miner_gpu_memory_free_bytes", labels) == 71680 * 1024 * 1024
    assert value("aitbc_miner_gpu_memory_total_bytes", labels) == 81920 * 1024 * 1024
    assert value("aitbc_miner_gpu_available", labels) == 1
    assert value("aitbc_miner_gpu_temperature_celsius", labels) == 41


@pytest.mark.parametrize("cuda_raw,expected", [(12040, "12.4"), (11080, "11.8"), (13000, "13.0")])
def test_cuda_version_text(cuda_raw, expected):
    scenario = fake_nvml.one_gpu()
    scenario["cuda"] = cuda_raw
    assert GpuInventory(FakeNvml(scenario)).snapshot()[0].cuda == expected
