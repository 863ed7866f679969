"""NVML snapshot behind a small interface (nvidia-ml-py, `import pynvml`).

I/O: talks to the NVIDIA driver. The NVML module is injected, so tests pass a
fake with the same functions. No driver or no GPU is a normal CPU-only node,
never an error; an NVML failure on one device marks that device unavailable.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    name: str
    vram_mb: int
    vram_free_mb: int
    util_pct: int
    pci_bus_id: str = ""
    temperature_c: int | None = None
    driver: str = ""
    cuda: str = ""
    available: bool = True

    def descriptor(self) -> dict[str, Any]:
        """The per-GPU entry of the capability descriptor (PROTOCOL.md)."""
        return {
            "index": self.index,
            "uuid": self.uuid,
            "vendor": "nvidia",
            "name": self.name,
            "vram_mb": self.vram_mb,
            "pci_bus_id": self.pci_bus_id,
            "cuda": {"version": self.cuda, "driver": self.driver},
        }

    def free_entry(self) -> dict[str, Any]:
        """The per-GPU entry of a heartbeat's `gpu_free`."""
        return {
            "index": self.index,
            "uuid": self.uuid,
            "vram_free_mb": self.vram_free_mb,
            "util_pct": self.util_pct,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuInventory:
    """Reads the GPUs through NVML; thread-safe, initialises NVML once."""

    def __init__(self, nvml: ModuleType | Any | None = None, *, enabled: bool = True) -> None:
        self._nvml = nvml
        self._enabled = enabled
        self._lock = threading.Lock()
        self._ready: bool | None = None  # None = not tried yet
        self.reason = ""

    def _init(self) -> bool:
        if self._ready is not None:
            return self._ready
        if not self._enabled:
            self._ready, self.reason = False, "gpu.enable is false"
            return False
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._ready = True
        except Exception as exc:  # NVMLError_LibraryNotFound, driver absent, ...
            self._ready, self.reason = False, f"{type(exc).__name__}: {exc}"
            log.info("gpu_unavailable", reason=self.reason)
        return self._ready

    def snapshot(self) -> list[GpuInfo]:
        """Every visible GPU now; an empty list on a CPU-only node."""
        with self._lock:
            if not self._init():
                return []
            nvml = self._nvml
            try:
                count = nvml.nvmlDeviceGetCount()
                driver = _text(nvml.nvmlSystemGetDriverVersion())
                cuda_raw = nvml.nvmlSystemGetCudaDriverVersion()
                cuda = f"{cuda_raw // 1000}.{(cuda_raw % 1000) // 10}"
            except Exception as exc:
                log.warning("gpu_inventory_failed", error=str(exc))
                return []
            return [self._device(nvml, i, driver, cuda) for i in range(count)]

    @staticmethod
    def _device(nvml: Any, index: int, driver: str, cuda: str) -> GpuInfo:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            name = _text(nvml.nvmlDeviceGetName(handle))
        except Exception as exc:
            log.warning("gpu_device_failed", index=index, error=str(exc))
            return GpuInfo(index, f"unavailable-{index}", "unavailable", 0, 0, 0, available=False)
        try:
            util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            util = 0
        try:
            pci = _text(nvml.nvmlDeviceGetPciInfo(handle).busId)
        except Exception:
            pci = ""
        try:
            temp = int(nvml.nvmlDeviceGetTemperature(handle, 0))  # NVML_TEMPERATURE_GPU
        except Exception:
            temp = None
        return GpuInfo(
            index=index,
            uuid=uuid,
            name=name,
            vram_mb=int(mem.total) // (1024 * 1024),
            vram_free_mb=int(mem.free) // (1024 * 1024),
            util_pct=util,
            pci_bus_id=pci,
            temperature_c=temp,
            driver=driver,
            cuda=cuda,
        )


class NoGpuFree(Exception):
    pass


def choose_gpus(
    gpus: list[GpuInfo],
    *,
    count: int,
    vram_mb: int,
    in_use: dict[str, int],
    jobs_per_gpu: int,
) -> tuple[str, ...]:
    """UUIDs of `count` GPUs with a free slot and `vram_mb` free, emptiest first.

    Pure. Raises NoGpuFree when the requirement cannot be met right now.
    """
    fits = [
        g
        for g in gpus
        if g.available and in_use.get(g.uuid, 0) < jobs_per_gpu and g.vram_free_mb >= vram_mb
    ]
    if len(fits) < count:
        raise NoGpuFree(f"need {count} GPU(s) with {vram_mb} MiB free, {len(fits)} fit")
    fits.sort(key=lambda g: (-g.vram_free_mb, g.index))
    return tuple(g.uuid for g in fits[:count])
