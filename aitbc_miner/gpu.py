"""GPU inventory over NVML (nvidia-ml-py, `import pynvml`) and the pure choice of GPUs.

I/O: `GpuInventory` talks to the NVIDIA driver; the NVML module is injected
(tests pass `tests/support/fake_nvml.py`). No driver or no GPU is a normal
CPU-only node, never an error. An NVML failure on one device marks that device
unavailable (keeping its last known identity) until NVML answers again; a GPU
left dirty by a job is quarantined until its leftover processes are gone.
Pure: `GpuInfo`, `choose_gpus` and the slot/VRAM figures advertised in pulls.
It must not decide anything about jobs beyond which devices they get.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any

import structlog

log = structlog.get_logger(__name__)

MIB = 1024 * 1024

# NVML's topology levels (nvmlGpuTopologyLevel_t): lower is closer.
TOPO_INTERNAL, TOPO_SINGLE, TOPO_MULTIPLE, TOPO_HOSTBRIDGE, TOPO_NODE, TOPO_SYSTEM = (
    0,
    10,
    20,
    30,
    40,
    50,
)
_EXHAUSTIVE_LIMIT = 20_000  # candidate sets examined for a multi-GPU job


@dataclass(frozen=True)
class GpuProcess:
    """A compute process NVML lists on a device."""

    pid: int
    used_mb: int


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
    vram_used_mb: int = 0
    mig: bool = False  # MIG mode on: the whole-GPU UUID runs no CUDA work
    numa_node: int | None = None
    links: tuple[tuple[str, int], ...] = ()  # (peer uuid, NVML topology level)
    processes: tuple[GpuProcess, ...] = ()
    reason: str = ""  # why the device is unavailable

    @property
    def schedulable(self) -> bool:
        return self.available and not self.mig

    def descriptor(self) -> dict[str, Any]:
        """The per-GPU entry of the capability descriptor (PROTOCOL.md)."""
        return {
            "index": self.index,
            "uuid": self.uuid,
            "vendor": "nvidia",
            "name": self.name,
            "vram_mb": self.vram_mb,
            "pci_bus_id": self.pci_bus_id,
            "numa_node": self.numa_node,
            "mig": self.mig,
            "cuda": {"version": self.cuda, "driver": self.driver},
        }

    def free_entry(self, vram_free_mb: int | None = None) -> dict[str, Any]:
        """The per-GPU entry of a heartbeat's `gpu_free`."""
        return {
            "index": self.index,
            "uuid": self.uuid,
            "vram_free_mb": self.vram_free_mb if vram_free_mb is None else vram_free_mb,
            "util_pct": self.util_pct,
            "temperature_c": self.temperature_c,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _optional(fn: Any, *args: Any) -> Any:
    """An NVML query whose failure (often NOT_SUPPORTED) just means "unknown"."""
    try:
        return fn(*args)
    except Exception:
        return None


def _missing_symbol(nvml: Any, exc: BaseException) -> bool:
    """`exc` says the driver's libnvidia-ml lacks the C symbol pynvml called.

    pynvml raises NVMLError_FunctionNotFound, wrapped as NVMLLibraryMismatchError
    by its unversioned functions (nvmlDeviceGetComputeRunningProcesses among them).
    """
    for name in ("NVMLLibraryMismatchError", "NVMLError_FunctionNotFound"):
        cls = getattr(nvml, name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


_PROCESSES_V2 = "nvmlDeviceGetComputeRunningProcesses_v2"  # pre-R510 drivers' listing


def _process_list(listed: Iterable[Any]) -> list[GpuProcess]:
    return [GpuProcess(int(p.pid), int(p.usedGpuMemory or 0) // MIB) for p in listed]


class GpuInventory:
    """Reads the GPUs through NVML; thread-safe, initialises NVML once."""

    def __init__(self, nvml: ModuleType | Any | None = None, *, enabled: bool = True) -> None:
        self._nvml = nvml
        self._enabled = enabled
        self._lock = threading.Lock()
        self._ready: bool | None = None  # None = not tried yet
        self.reason = ""
        self._known: dict[str, GpuInfo] = {}  # uuid -> last good reading
        self._links: dict[frozenset[str], int | None] = {}  # None: NVML cannot tell
        self._down: dict[str, str] = {}  # uuid -> reason, for one log line per transition
        self._quarantine: dict[str, frozenset[int]] = {}  # uuid -> leftover pids
        self._mig_logged: set[str] = set()
        self._processes_v2 = False  # the driver lacks ..._v3: list through ..._v2

    @property
    def active(self) -> bool:
        """NVML answered at start: keep refreshing, even while every device errors."""
        return self._ready is True

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
            log.info("gpu_unavailable_cpu_only", reason=self.reason)
        return self._ready

    # -- snapshots ---------------------------------------------------------------------

    def snapshot(self) -> list[GpuInfo]:
        """Every GPU now (plus known ones NVML lost, as unavailable); [] on a CPU-only node."""
        with self._lock:
            if not self._init():
                return []
            nvml = self._nvml
            try:
                count = int(nvml.nvmlDeviceGetCount())
                driver = _text(nvml.nvmlSystemGetDriverVersion())
                cuda_raw = int(nvml.nvmlSystemGetCudaDriverVersion())
                cuda = f"{cuda_raw // 1000}.{(cuda_raw % 1000) // 10}"
            except Exception as exc:
                reason = f"NVML: {type(exc).__name__}: {exc}"
                gpus = [self._unavailable(g, reason) for g in self._known.values()]
                self._log_transitions(gpus)
                return gpus
            gpus = [self._device(nvml, i, driver, cuda) for i in range(count)]
            seen = {g.uuid for g in gpus}
            gpus += [
                self._unavailable(g, "no longer listed by NVML")
                for u, g in self._known.items()
                if u not in seen
            ]
            gpus = self._with_links(nvml, gpus)
            gpus = [self._apply_quarantine(g) for g in gpus]
            for g in gpus:
                if g.available:
                    self._known[g.uuid] = g
            self._log_transitions(gpus)
            return sorted(gpus, key=lambda g: g.index)

    def _device(self, nvml: Any, index: int, driver: str, cuda: str) -> GpuInfo:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        except Exception as exc:
            prior = next((g for g in self._known.values() if g.index == index), None)
            reason = f"{type(exc).__name__}: {exc}"
            if prior is not None:
                return self._unavailable(prior, reason)
            placeholder = GpuInfo(index, f"unavailable-{index}", "unavailable", 0, 0, 0)
            return self._unavailable(placeholder, reason)
        try:
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = _text(nvml.nvmlDeviceGetName(handle))
            mig = _optional(nvml.nvmlDeviceGetMigMode, handle)
            mig_on = bool(mig and mig[0] == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1))
            # In MIG mode NVML lists the whole GPU's processes to privileged callers
            # only (NoPermission for the daemon's user): unknown, not a failure.
            processes = tuple(
                (_optional(self._processes, nvml, handle) or ())
                if mig_on
                else self._processes(nvml, handle)
            )
        except Exception as exc:
            prior = self._known.get(uuid) or GpuInfo(index, uuid, "unavailable", 0, 0, 0)
            return self._unavailable(prior, f"{type(exc).__name__}: {exc}")
        util = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        pci = _optional(nvml.nvmlDeviceGetPciInfo, handle)
        temp = _optional(
            nvml.nvmlDeviceGetTemperature, handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
        )
        numa = _optional(getattr(nvml, "nvmlDeviceGetNumaNodeId", None), handle)
        return GpuInfo(
            index=index,
            uuid=uuid,
            name=name,
            vram_mb=int(mem.total) // MIB,
            vram_free_mb=int(mem.free) // MIB,
            vram_used_mb=int(mem.used) // MIB,
            util_pct=int(util.gpu) if util is not None else 0,
            pci_bus_id=_text(pci.busId) if pci is not None else "",
            temperature_c=int(temp) if temp is not None else None,
            driver=driver,
            cuda=cuda,
            mig=mig_on,
            numa_node=int(numa) if isinstance(numa, int) and numa >= 0 else None,
            processes=processes,
        )

    def _processes(self, nvml: Any, handle: Any) -> list[GpuProcess]:
        """NVML's compute processes on a device, through the call this driver has.

        pynvml's nvmlDeviceGetComputeRunningProcesses calls only the C symbol
        ..._v3, which drivers before R510 (R470, common on mining rigs) lack; they
        have ..._v2, which fills the same entries. The first missing-symbol failure
        switches this inventory to _v2 for good (the loaded library does not change);
        any other failure is the device's and is raised as it is. Caller holds _lock.
        """
        if not self._processes_v2:
            try:
                return _process_list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
            except Exception as exc:
                if not _missing_symbol(nvml, exc) or not hasattr(nvml, _PROCESSES_V2):
                    raise
                self._processes_v2 = True
                log.info(
                    "gpu_processes_legacy_call",
                    call=_PROCESSES_V2,
                    missing="nvmlDeviceGetComputeRunningProcesses_v3",
                    error=type(exc).__name__,
                )
        return _process_list(nvml.nvmlDeviceGetComputeRunningProcesses_v2(handle))

    @staticmethod
    def _unavailable(g: GpuInfo, reason: str) -> GpuInfo:
        return replace(g, available=False, reason=reason, vram_free_mb=0, util_pct=0, processes=())

    def _with_links(self, nvml: Any, gpus: list[GpuInfo]) -> list[GpuInfo]:
        """Attach the PCIe topology between devices (static: asked once per pair)."""
        fn = getattr(nvml, "nvmlDeviceGetTopologyCommonAncestor", None)
        healthy = [g for g in gpus if g.available]
        if fn is None or len(healthy) < 2:
            return gpus
        for a, b in itertools.combinations(healthy, 2):
            pair = frozenset((a.uuid, b.uuid))
            if pair in self._links:
                continue
            try:
                level = fn(
                    nvml.nvmlDeviceGetHandleByIndex(a.index),
                    nvml.nvmlDeviceGetHandleByIndex(b.index),
                )
            except Exception as exc:  # NOT_SUPPORTED on some boards: locality unknown
                log.debug("gpu_topology_unknown", a=a.index, b=b.index, error=str(exc))
                self._links[pair] = None
                continue
            self._links[pair] = int(level)
        out = []
        for g in gpus:
            links = tuple(
                sorted(
                    (next(iter(pair - {g.uuid})), level)
                    for pair, level in self._links.items()
                    if g.uuid in pair and level is not None
                )
            )
            out.append(replace(g, links=links))
        return out

    def _apply_quarantine(self, g: GpuInfo) -> GpuInfo:
        held = self._quarantine.get(g.uuid)
        if held is None or not g.available:
            return g
        still = held & {p.pid for p in g.processes}
        if not still:
            del self._quarantine[g.uuid]
            log.info("gpu_quarantine_released", index=g.index, uuid=g.uuid)
            return g
        self._quarantine[g.uuid] = frozenset(still)
        return replace(
            g,
            available=False,
            reason=f"leftover job processes hold memory: {sorted(still)}",
        )

    def _log_transitions(self, gpus: Iterable[GpuInfo]) -> None:
        for g in gpus:
            if not g.available and self._down.get(g.uuid) != g.reason:
                log.warning("gpu_marked_unavailable", index=g.index, uuid=g.uuid, reason=g.reason)
                self._down[g.uuid] = g.reason
            elif g.available and g.uuid in self._down:
                del self._down[g.uuid]
                log.info("gpu_available_again", index=g.index, uuid=g.uuid)
            if g.mig and g.uuid not in self._mig_logged:
                self._mig_logged.add(g.uuid)
                log.info("gpu_mig_enabled_not_scheduled", index=g.index, uuid=g.uuid)

    # -- helpers for the post-job sweep ------------------------------------------------

    def compute_processes(self, uuid: str) -> list[GpuProcess] | None:
        """The compute processes on one device now; None if NVML cannot say."""
        with self._lock:
            if not self._init():
                return None
            nvml = self._nvml
            try:
                return self._processes(nvml, nvml.nvmlDeviceGetHandleByUUID(uuid))
            except Exception as exc:
                log.warning("gpu_processes_unreadable", uuid=uuid, error=str(exc))
                return None

    def quarantine(self, uuid: str, pids: Iterable[int]) -> None:
        """Keep `uuid` unavailable while NVML still lists any of `pids` on it."""
        with self._lock:
            self._quarantine[uuid] = self._quarantine.get(uuid, frozenset()) | frozenset(pids)

    @property
    def quarantined(self) -> dict[str, frozenset[int]]:
        with self._lock:
            return dict(self._quarantine)


# -- pure policy -------------------------------------------------------------------------


class NoGpuFree(Exception):
    pass


def effective_free_mb(g: GpuInfo, reserved_mb: Mapping[str, int]) -> int:
    """Free VRAM counting what our own jobs on the device reserved but may not use yet.

    NVML's free figure already includes foreign processes and whatever our jobs
    allocated; `total - reserved` bounds it for jobs that have not allocated yet.
    """
    return max(0, min(g.vram_free_mb, g.vram_mb - reserved_mb.get(g.uuid, 0)))


def _open_devices(
    gpus: Iterable[GpuInfo], in_use: Mapping[str, int], jobs_per_gpu: int
) -> list[GpuInfo]:
    return [g for g in gpus if g.schedulable and in_use.get(g.uuid, 0) < jobs_per_gpu]


def device_slots_free(gpus: Iterable[GpuInfo], in_use: Mapping[str, int], jobs_per_gpu: int) -> int:
    return sum(
        jobs_per_gpu - in_use.get(g.uuid, 0) for g in _open_devices(gpus, in_use, jobs_per_gpu)
    )


def vram_offers(
    gpus: Iterable[GpuInfo],
    in_use: Mapping[str, int],
    jobs_per_gpu: int,
    reserved_mb: Mapping[str, int],
) -> list[int]:
    """`filters.vram_free_mb` of a pull: what a new job could get on each open device."""
    return [effective_free_mb(g, reserved_mb) for g in _open_devices(gpus, in_use, jobs_per_gpu)]


def distance(a: GpuInfo, b: GpuInfo) -> int:
    """How far apart two GPUs are (NVML topology level); SYSTEM when nothing is known."""
    for x, y in ((a, b), (b, a)):
        for peer, level in x.links:
            if peer == y.uuid:
                return level
    if a.numa_node is not None and b.numa_node is not None:
        return TOPO_NODE if a.numa_node == b.numa_node else TOPO_SYSTEM
    return TOPO_SYSTEM


def choose_gpus(
    gpus: Sequence[GpuInfo],
    *,
    count: int,
    vram_mb: int,
    in_use: Mapping[str, int],
    jobs_per_gpu: int,
    reserved_mb: Mapping[str, int] | None = None,
) -> tuple[GpuInfo, ...]:
    """`count` GPUs with a free slot and `vram_mb` free each, ordered by index.

    One GPU: the least-used VRAM (most free) that fits. Several: among the sets
    that fit, the closest together (same PCIe switch, then host bridge, then
    NUMA node, when NVML tells), then the most free VRAM in total. Unavailable,
    MIG-mode and fully booked devices are skipped; foreign processes only count
    through the VRAM they hold. Raises NoGpuFree when nothing fits right now.
    """
    reserved = reserved_mb or {}
    free = {g.uuid: effective_free_mb(g, reserved) for g in gpus}
    fits = [g for g in _open_devices(gpus, in_use, jobs_per_gpu) if free[g.uuid] >= vram_mb]
    if count < 1 or len(fits) < count:
        raise NoGpuFree(
            f"need {count} GPU(s) with {vram_mb} MiB free and a free slot, {len(fits)} fit"
        )
    fits.sort(key=lambda g: (-free[g.uuid], g.index))
    if count == 1:
        return (fits[0],)
    while len(fits) > count and math.comb(len(fits), count) > _EXHAUSTIVE_LIMIT:
        fits.pop()  # drop the fullest until the search is small

    def score(group: tuple[GpuInfo, ...]) -> tuple[int, int, tuple[int, ...]]:
        spread = max(distance(a, b) for a, b in itertools.combinations(group, 2))
        return spread, -sum(free[g.uuid] for g in group), tuple(g.index for g in group)

    best = min(itertools.combinations(fits, count), key=score)
    return tuple(sorted(best, key=lambda g: g.index))
