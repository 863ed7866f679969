"""An in-memory stand-in for the pynvml functions aitbc-miner calls (tests only).

Unit tests pass `FakeNvml(scenario)` to `GpuInventory(nvml=...)`; integration
tests run a real miner through `tests/support/fake_nvml_launcher.py`, which
installs `FakeNvml.from_file(path)` as `sys.modules["pynvml"]`. A file-backed
fake re-reads its scenario whenever the file changes, so a test can make a GPU
fail or recover while the miner runs.

Scenario (JSON-able):
    {"init_error": null | "library_not_found" | "driver_not_loaded",
     "system_error": null | "unknown",          # count/driver queries fail
     "driver": "550.54.15", "cuda": 12040,
     "topology": [[0, 1, 10], ...],              # index pairs and NVML level; others NOT_SUPPORTED
     "gpus": [{"uuid": "GPU-...", "name": "...", "total_mb": 24576, "used_mb": 0,
               "util": 0, "temp": 40, "pci": "00000000:01:00.0", "numa": 0 | null,
               "mig": false, "error": null | "gpu_lost" | "unknown",
               "processes": [{"pid": 1234, "used_mb": 500, "sticky": false}],
               "pid_files": ["/path/to/pidfile"], "pid_file_mb": 512}]}

A listed process counts only while it is alive and not a zombie, as a real
driver frees a process's memory when it exits, unless it is `sticky` (a
driver that does not let go). `pid_files` are read on every query: a job can
write its own pid there to appear as a compute process on that GPU.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_TEMPERATURE_GPU = 0
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1

NVML_TOPOLOGY_INTERNAL = 0
NVML_TOPOLOGY_SINGLE = 10
NVML_TOPOLOGY_MULTIPLE = 20
NVML_TOPOLOGY_HOSTBRIDGE = 30
NVML_TOPOLOGY_NODE = 40
NVML_TOPOLOGY_SYSTEM = 50

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like pynvml.NVMLError: `NVMLError(code)` builds the matching subclass."""

    _by_code: dict[int, type[NVMLError]] = {}

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._by_code.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML Error with code {self.value}")


def _subclass(name: str, code: int) -> type[NVMLError]:
    cls = type(name, (NVMLError,), {})
    NVMLError._by_code[code] = cls
    return cls


NVMLError_Uninitialized = _subclass("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _subclass("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _subclass("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NotFound = _subclass("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _subclass("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _subclass("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_GpuIsLost = _subclass("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _subclass("NVMLError_Unknown", NVML_ERROR_UNKNOWN)

_NAMED_ERRORS = {
    "library_not_found": NVML_ERROR_LIBRARY_NOT_FOUND,
    "driver_not_loaded": NVML_ERROR_DRIVER_NOT_LOADED,
    "gpu_lost": NVML_ERROR_GPU_IS_LOST,
    "unknown": NVML_ERROR_UNKNOWN,
}


@dataclass(frozen=True)
class Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class Utilization:
    gpu: int
    memory: int


@dataclass(frozen=True)
class PciInfo:
    busId: bytes


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    usedGpuMemory: int | None


@dataclass(frozen=True)
class Handle:
    index: int


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


# -- scenarios ------------------------------------------------------------------------------


def gpu(index: int, total_mb: int, used_mb: int = 0, **extra: Any) -> dict[str, Any]:
    spec = {
        "uuid": f"GPU-{index:08x}-fake-4000-8000-{index:012x}",
        "name": extra.pop("name", "NVIDIA Fake"),
        "total_mb": total_mb,
        "used_mb": used_mb,
        "util": 0,
        "temp": 40 + index,
        "pci": f"00000000:{index + 1:02X}:00.0",
        "numa": None,
        "mig": False,
        "error": None,
        "processes": [],
    }
    spec.update(extra)
    return spec


def no_gpu() -> dict[str, Any]:
    return {"init_error": "library_not_found", "gpus": []}


def one_gpu() -> dict[str, Any]:
    return {"gpus": [gpu(0, 16384, 512, name="NVIDIA GeForce RTX 4060 Ti")]}


def four_mixed() -> dict[str, Any]:
    """Four GPUs of different sizes and loads; 0+1 and 2+3 share a PCIe switch."""
    return {
        "gpus": [
            gpu(0, 24576, 20480, name="NVIDIA GeForce RTX 4090", util=90, numa=0),
            gpu(1, 81920, 10240, name="NVIDIA H100 80GB HBM3", numa=0),
            gpu(2, 16384, 1024, name="NVIDIA RTX A4000", numa=1),
            gpu(3, 49152, 8192, name="NVIDIA L40S", numa=1),
        ],
        "topology": [
            [0, 1, NVML_TOPOLOGY_SINGLE],
            [2, 3, NVML_TOPOLOGY_SINGLE],
            [0, 2, NVML_TOPOLOGY_SYSTEM],
            [0, 3, NVML_TOPOLOGY_SYSTEM],
            [1, 2, NVML_TOPOLOGY_SYSTEM],
            [1, 3, NVML_TOPOLOGY_SYSTEM],
        ],
    }


def busy_foreign(pid: int, used_mb: int = 20000) -> dict[str, Any]:
    """Two 24 GiB GPUs; GPU 0 holds a foreign compute process (`pid`, sticky)."""
    return {
        "gpus": [
            gpu(0, 24576, 0, processes=[{"pid": pid, "used_mb": used_mb, "sticky": True}]),
            gpu(1, 24576, 0),
        ]
    }


def write_scenario(path: Path, scenario: dict[str, Any]) -> None:
    """Replace the scenario file atomically (a file-backed fake never reads half of it)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(scenario))
    os.replace(tmp, path)


# -- the fake module -----------------------------------------------------------------------


class FakeNvml:
    """Module-like object with pynvml's names; every call is recorded in `calls`."""

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_NotFound = NVMLError_NotFound
    NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_GpuIsLost = NVMLError_GpuIsLost
    NVMLError_Unknown = NVMLError_Unknown
    NVML_ERROR_NOT_SUPPORTED = NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_GPU_IS_LOST = NVML_ERROR_GPU_IS_LOST
    NVML_ERROR_LIBRARY_NOT_FOUND = NVML_ERROR_LIBRARY_NOT_FOUND
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_DISABLE = NVML_DEVICE_MIG_DISABLE
    NVML_DEVICE_MIG_ENABLE = NVML_DEVICE_MIG_ENABLE
    NVML_TOPOLOGY_SINGLE = NVML_TOPOLOGY_SINGLE
    NVML_TOPOLOGY_NODE = NVML_TOPOLOGY_NODE
    NVML_TOPOLOGY_SYSTEM = NVML_TOPOLOGY_SYSTEM

    def __init__(self, scenario: dict[str, Any] | None = None, *, path: Path | None = None):
        self._scenario: dict[str, Any] = scenario if scenario is not None else one_gpu()
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self.initialized = False
        self.calls: list[str] = []

    @classmethod
    def from_file(cls, path: str | Path) -> FakeNvml:
        fake = cls({}, path=Path(path))
        fake._reload()
        return fake

    # -- scenario access and steering -------------------------------------------------

    @property
    def scenario(self) -> dict[str, Any]:
        self._reload()
        return self._scenario

    def _reload(self) -> None:
        if self._path is None:
            return
        st = self._path.stat()
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            self._scenario = json.loads(self._path.read_text())
            self._stamp = stamp

    def set_gpu(self, index: int, **changes: Any) -> None:
        """Change a device in place (unit tests): error, used_mb, processes, ..."""
        self._scenario["gpus"][index].update(changes)

    def set(self, **changes: Any) -> None:
        self._scenario.update(changes)

    def _record(self, name: str) -> dict[str, Any]:
        with self._lock:
            self.calls.append(name)
        scenario = self.scenario
        if not self.initialized and name != "nvmlInit":
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        return scenario

    def _device(self, name: str, handle: Handle) -> dict[str, Any]:
        gpus = self._record(name)["gpus"]
        if not isinstance(handle, Handle) or not 0 <= handle.index < len(gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        spec = gpus[handle.index]
        if spec.get("error"):
            raise NVMLError(_NAMED_ERRORS.get(spec["error"], NVML_ERROR_UNKNOWN))
        return spec

    def _system(self, name: str) -> dict[str, Any]:
        scenario = self._record(name)
        if scenario.get("system_error"):
            raise NVMLError(_NAMED_ERRORS.get(scenario["system_error"], NVML_ERROR_UNKNOWN))
        return scenario

    @staticmethod
    def _processes(spec: dict[str, Any]) -> list[ProcessInfo]:
        out = []
        for p in spec.get("processes", []):
            if p.get("sticky") or _alive(int(p["pid"])):
                out.append(ProcessInfo(int(p["pid"]), int(p.get("used_mb", 0)) * MIB))
        for pid_file in spec.get("pid_files", []):
            try:
                text = Path(pid_file).read_text().split()
            except OSError:
                continue
            for word in text:
                if word.isdigit() and _alive(int(word)):
                    out.append(ProcessInfo(int(word), int(spec.get("pid_file_mb", 512)) * MIB))
        return out

    # -- pynvml API -----------------------------------------------------------------------

    def nvmlInit(self) -> None:
        scenario = self._record("nvmlInit")
        if scenario.get("init_error"):
            raise NVMLError(_NAMED_ERRORS.get(scenario["init_error"], NVML_ERROR_UNKNOWN))
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._record("nvmlShutdown")
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self._system("nvmlSystemGetDriverVersion").get("driver", "550.54.15"))

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return int(self._system("nvmlSystemGetCudaDriverVersion").get("cuda", 12040))

    def nvmlDeviceGetCount(self) -> int:
        return len(self._system("nvmlDeviceGetCount")["gpus"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Handle:
        handle = Handle(int(index))
        self._device("nvmlDeviceGetHandleByIndex", handle)
        return handle

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> Handle:
        if isinstance(uuid, bytes):
            uuid = uuid.decode()
        gpus = self._record("nvmlDeviceGetHandleByUUID")["gpus"]
        for index, spec in enumerate(gpus):
            if spec["uuid"] == uuid:
                return self.nvmlDeviceGetHandleByIndex(index)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetUUID(self, handle: Handle) -> str:
        return str(self._device("nvmlDeviceGetUUID", handle)["uuid"])

    def nvmlDeviceGetName(self, handle: Handle) -> str:
        return str(self._device("nvmlDeviceGetName", handle).get("name", "NVIDIA Fake"))

    def nvmlDeviceGetMemoryInfo(self, handle: Handle) -> Memory:
        spec = self._device("nvmlDeviceGetMemoryInfo", handle)
        total = int(spec["total_mb"]) * MIB
        used = int(spec.get("used_mb", 0)) * MIB
        used += sum(p.usedGpuMemory or 0 for p in self._processes(spec))
        used = min(used, total)
        return Memory(total=total, free=total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: Handle) -> Utilization:
        spec = self._device("nvmlDeviceGetUtilizationRates", handle)
        return Utilization(gpu=int(spec.get("util", 0)), memory=0)

    def nvmlDeviceGetPciInfo(self, handle: Handle) -> PciInfo:
        spec = self._device("nvmlDeviceGetPciInfo", handle)
        return PciInfo(busId=str(spec.get("pci", "")).encode())

    def nvmlDeviceGetTemperature(self, handle: Handle, sensor: int) -> int:
        spec = self._device("nvmlDeviceGetTemperature", handle)
        if sensor != NVML_TEMPERATURE_GPU or spec.get("temp") is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return int(spec["temp"])

    def nvmlDeviceGetMigMode(self, handle: Handle) -> list[int]:
        spec = self._device("nvmlDeviceGetMigMode", handle)
        if spec.get("mig") is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        mode = NVML_DEVICE_MIG_ENABLE if spec["mig"] else NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetNumaNodeId(self, handle: Handle) -> int:
        spec = self._device("nvmlDeviceGetNumaNodeId", handle)
        if spec.get("numa") is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return int(spec["numa"])

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Handle) -> list[ProcessInfo]:
        return self._processes(self._device("nvmlDeviceGetComputeRunningProcesses", handle))

    def nvmlDeviceGetComputeRunningProcesses_v2(self, handle: Handle) -> list[ProcessInfo]:
        """The listing of drivers before R510 (gpu.py's fallback); the same entries here.

        The unversioned call above never fails for a missing symbol, so the inventory
        only calls this one if a test does; tests/support/nvml_shim plays such a driver.
        """
        return self._processes(self._device("nvmlDeviceGetComputeRunningProcesses_v2", handle))

    def nvmlDeviceGetTopologyCommonAncestor(self, a: Handle, b: Handle) -> int:
        scenario = self._record("nvmlDeviceGetTopologyCommonAncestor")
        self._device("nvmlDeviceGetTopologyCommonAncestor", a)
        self._device("nvmlDeviceGetTopologyCommonAncestor", b)
        for x, y, level in scenario.get("topology", []):
            if {x, y} == {a.index, b.index}:
                return int(level)
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
