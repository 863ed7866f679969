"""GPU selection policy (gpu.choose_gpus and the pull figures): pure, over fake inventories."""

from __future__ import annotations

import pytest

from aitbc_miner.gpu import (
    TOPO_NODE,
    TOPO_SINGLE,
    TOPO_SYSTEM,
    GpuInfo,
    GpuInventory,
    NoGpuFree,
    choose_gpus,
    device_slots_free,
    distance,
    effective_free_mb,
    vram_offers,
)
from tests.support import fake_nvml


def snapshot(scenario: dict) -> list[GpuInfo]:
    return GpuInventory(fake_nvml.FakeNvml(scenario)).snapshot()


def uuid(i: int) -> str:
    return fake_nvml.gpu(i, 1)["uuid"]


# four_mixed: free MiB 0: 4096 (busy, 90%), 1: 71680, 2: 15360, 3: 40960;
# 0+1 share a PCIe switch, 2+3 share another.
FOUR = snapshot(fake_nvml.four_mixed())


def pick(gpus=FOUR, *, count=1, vram=0, in_use=None, per_gpu=1, reserved=None) -> list[int]:
    chosen = choose_gpus(
        gpus,
        count=count,
        vram_mb=vram,
        in_use=in_use or {},
        jobs_per_gpu=per_gpu,
        reserved_mb=reserved,
    )
    return [g.index for g in chosen]


@pytest.mark.parametrize(
    ("vram", "in_use", "expected"),
    [
        (0, {}, [1]),  # least-used VRAM first
        (70000, {}, [1]),  # only GPU 1 fits
        (71680, {}, [1]),  # exactly fits
        (40000, {1: 1}, [3]),  # GPU 1 busy: next emptiest that fits
        (16000, {1: 1, 3: 1}, None),  # 2 has 15360, 0 has 4096: no fit
        (4000, {1: 1, 3: 1, 2: 1}, [0]),  # the busy-with-foreign-load GPU still fits 4 GB
        (80000, {}, None),  # more than any GPU has
    ],
)
def test_single_gpu_fits_or_not(vram, in_use, expected):
    in_use = {uuid(i): n for i, n in in_use.items()}
    if expected is None:
        with pytest.raises(NoGpuFree):
            pick(vram=vram, in_use=in_use)
    else:
        assert pick(vram=vram, in_use=in_use) == expected


@pytest.mark.parametrize(
    ("count", "vram", "in_use", "expected"),
    [
        (2, 0, {}, [0, 1]),  # same switch beats "two emptiest" (1 and 3 are on different NUMA)
        (2, 10000, {}, [2, 3]),  # GPU 0 cannot hold 10 GB: the other switch pair
        (2, 20000, {}, [1, 3]),  # only 1 and 3 fit: closeness cannot be had
        (2, 0, {1: 1}, [2, 3]),  # GPU 1 busy: the intact pair
        (3, 0, {}, [1, 2, 3]),  # no triple shares a switch: most free VRAM in total
        (4, 0, {}, [0, 1, 2, 3]),
        (4, 5000, {}, None),  # GPU 0 has 4096
        (2, 0, {0: 1, 1: 1, 2: 1}, None),  # only one device has a slot
    ],
)
def test_multi_gpu_picks_count_preferring_topology(count, vram, in_use, expected):
    in_use = {uuid(i): n for i, n in in_use.items()}
    if expected is None:
        with pytest.raises(NoGpuFree):
            pick(count=count, vram=vram, in_use=in_use)
    else:
        assert pick(count=count, vram=vram, in_use=in_use) == expected


def test_without_topology_two_of_four_are_the_two_emptiest():
    scenario = fake_nvml.four_mixed()
    scenario.pop("topology")
    for g in scenario["gpus"]:
        g["numa"] = None
    assert pick(snapshot(scenario), count=2) == [1, 3]


def test_numa_node_is_the_tie_break_when_pcie_topology_is_unknown():
    scenario = fake_nvml.four_mixed()
    scenario.pop("topology")
    gpus = snapshot(scenario)
    assert distance(gpus[0], gpus[1]) == TOPO_NODE
    assert distance(gpus[1], gpus[3]) == TOPO_SYSTEM
    assert pick(gpus, count=2) == [0, 1]  # NUMA 0 pair holds the most free VRAM
    assert pick(gpus, count=2, vram=5000) == [2, 3]


def test_distance_reads_links_in_either_direction():
    a = FOUR[0]
    b = FOUR[1]
    assert distance(a, b) == distance(b, a) == TOPO_SINGLE


@pytest.mark.parametrize(
    ("per_gpu", "in_use", "expected_slots"),
    [
        (1, {}, 4),
        (1, {1: 1}, 3),
        (2, {1: 1}, 7),
        (2, {1: 2, 3: 2}, 4),
        (3, {0: 3, 1: 3, 2: 3, 3: 3}, 0),
    ],
)
def test_jobs_per_gpu_slots(per_gpu, in_use, expected_slots):
    in_use = {uuid(i): n for i, n in in_use.items()}
    assert device_slots_free(FOUR, in_use, per_gpu) == expected_slots


def test_second_slot_on_a_gpu_counts_what_the_first_job_reserved():
    one = snapshot(fake_nvml.one_gpu())  # 16384 MiB, 512 used
    u = one[0].uuid
    assert pick(one, vram=10000, per_gpu=2) == [0]
    reserved = {u: 10000}
    assert effective_free_mb(one[0], reserved) == 16384 - 10000
    with pytest.raises(NoGpuFree):  # NVML still says 15872 free: the first job has not allocated
        pick(one, vram=10000, in_use={u: 1}, per_gpu=2, reserved=reserved)
    assert pick(one, vram=6000, in_use={u: 1}, per_gpu=2, reserved=reserved) == [0]
    assert vram_offers(one, {u: 1}, 2, reserved) == [6384]
    assert vram_offers(one, {u: 2}, 2, reserved) == []  # no slot left: nothing offered


def test_busy_foreign_process_costs_only_its_vram():
    gpus = snapshot(fake_nvml.busy_foreign(pid=4242, used_mb=20000))
    assert [p.pid for p in gpus[0].processes] == [4242]
    assert pick(gpus, vram=4000, in_use={gpus[1].uuid: 1}) == [0]  # 4576 free: fits
    with pytest.raises(NoGpuFree):
        pick(gpus, vram=5000, in_use={gpus[1].uuid: 1})
    assert pick(gpus, vram=5000) == [1]


def test_unavailable_and_mig_devices_are_never_chosen():
    scenario = fake_nvml.four_mixed()
    scenario["gpus"][1]["error"] = "gpu_lost"
    scenario["gpus"][3]["mig"] = True
    gpus = snapshot(scenario)
    assert [g.index for g in gpus if g.schedulable] == [0, 2]
    assert pick(gpus) == [2]
    assert device_slots_free(gpus, {}, 1) == 2
    assert vram_offers(gpus, {}, 1, {}) == [4096, 15360]


def test_empty_inventory_is_no_gpu():
    with pytest.raises(NoGpuFree):
        pick([], vram=0)
    assert device_slots_free([], {}, 1) == 0


def test_large_nodes_stay_fast_and_correct():
    gpus = [
        GpuInfo(i, f"GPU-{i}", "x", 81920, 81920 - i * 100, 0, numa_node=i // 8) for i in range(16)
    ]
    assert pick(gpus, count=8) == list(range(8))  # NUMA 0 holds the emptiest eight
    assert pick(gpus, count=8, in_use={"GPU-0": 1}) == list(range(8, 16))
