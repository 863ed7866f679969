"""Prometheus metric objects of the daemon (`aitbc_miner_*`).

Pure declarations on a per-daemon registry (tests create as many as they like);
exposition is prometheus_client's, served by health.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from . import __version__

MIB = 1024 * 1024


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "aitbc_miner_build_info", "Build information (always 1).", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self.jobs = Counter(
            "aitbc_miner_jobs",
            "Jobs finished, by outcome (done|failed|retry_wait|abandoned), error code and runner.",
            ["outcome", "code", "runner"],
            registry=r,
        )
        self.running = Gauge("aitbc_miner_jobs_running", "Jobs currently executing.", registry=r)
        self.job_starts = Counter(
            "aitbc_miner_job_starts",
            "Job processes started, by kind: warm (cgroups joined and network namespace "
            "entered ahead of time) or cold (all of it on the job's start path).",
            ["start"],
            registry=r,
        )
        self.queued = Gauge(
            "aitbc_miner_jobs_queued",
            "Jobs acked but not yet running (preparing inputs).",
            registry=r,
        )
        self.job_duration = Histogram(
            "aitbc_miner_job_duration_seconds",
            "Wall time of a job from ack to final report.",
            ["runner"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400),
            registry=r,
        )
        self.heartbeats = Counter(
            "aitbc_miner_heartbeats",
            "Heartbeats sent, by result (ok|error).",
            ["result"],
            registry=r,
        )
        self.heartbeat_last_success = Gauge(
            "aitbc_miner_heartbeat_last_success_timestamp_seconds",
            "Unix time of the last successful heartbeat.",
            registry=r,
        )
        self.requests = Counter(
            "aitbc_miner_coordinator_requests",
            "Coordinator HTTP requests, by endpoint and status code (or 'error').",
            ["endpoint", "code"],
            registry=r,
        )
        self.upload_bytes = Counter(
            "aitbc_miner_upload_bytes", "Artifact bytes sent to the coordinator.", registry=r
        )
        self.slots_total = Gauge(
            "aitbc_miner_slots", "Configured job slots, by kind (cpu|gpu).", ["kind"], registry=r
        )
        self.slots_used = Gauge(
            "aitbc_miner_slots_in_use", "Job slots in use, by kind (cpu|gpu).", ["kind"], registry=r
        )
        self.recovered = Gauge(
            "aitbc_miner_recovered_jobs",
            "Jobs reconciled at start-up, by action.",
            ["action"],
            registry=r,
        )
        self.gpu_memory_free = Gauge(
            "aitbc_miner_gpu_memory_free_bytes", "Free GPU memory.", ["index", "uuid"], registry=r
        )
        self.gpu_memory_used = Gauge(
            "aitbc_miner_gpu_memory_used_bytes", "Used GPU memory.", ["index", "uuid"], registry=r
        )
        self.gpu_util = Gauge(
            "aitbc_miner_gpu_utilization_ratio",
            "GPU utilisation (0-1).",
            ["index", "uuid"],
            registry=r,
        )
        self._gpu_metrics(r)
        self._cache_metrics(r)

    # -- GPUs and the model cache (gpu.py, gpu_sweep.py, cache.py) -------------------------

    def _gpu_metrics(self, r: CollectorRegistry) -> None:
        gpu_labels = ["index", "uuid"]
        self.gpu_memory_total = Gauge(
            "aitbc_miner_gpu_memory_total_bytes", "GPU memory size.", gpu_labels, registry=r
        )
        self.gpu_temperature = Gauge(
            "aitbc_miner_gpu_temperature_celsius", "GPU core temperature.", gpu_labels, registry=r
        )
        self.gpu_available = Gauge(
            "aitbc_miner_gpu_available",
            "1 when the GPU can take jobs; 0 when NVML fails on it, quarantined or MIG mode.",
            gpu_labels,
            registry=r,
        )
        self.gpu_sweep_kills = Counter(
            "aitbc_miner_gpu_sweep_kills",
            "Leftover job processes killed on a GPU after their job ended.",
            registry=r,
        )

    def _cache_metrics(self, r: CollectorRegistry) -> None:
        self.cache_hits = Counter(
            "aitbc_miner_cache_hits", "Cached inputs served from the model cache.", registry=r
        )
        self.cache_misses = Counter(
            "aitbc_miner_cache_misses", "Cached inputs that had to be downloaded.", registry=r
        )
        self.cache_download_bytes = Counter(
            "aitbc_miner_cache_download_bytes", "Bytes downloaded to fill the cache.", registry=r
        )
        self.cache_evictions = Counter(
            "aitbc_miner_cache_evictions", "Cache entries evicted (LRU).", registry=r
        )
        self.cache_bytes = Gauge(
            "aitbc_miner_cache_bytes", "Bytes held by the model cache.", registry=r
        )
        self.cache_entries = Gauge(
            "aitbc_miner_cache_entries", "Entries in the model cache.", registry=r
        )

    def export_gpus(self, gpus: Iterable[Any]) -> None:
        """Set the per-GPU gauges from a `gpu.GpuInfo` snapshot."""
        for g in gpus:
            labels = {"index": str(g.index), "uuid": g.uuid}
            self.gpu_memory_total.labels(**labels).set(g.vram_mb * MIB)
            self.gpu_memory_free.labels(**labels).set(g.vram_free_mb * MIB)
            used = g.vram_used_mb or max(0, g.vram_mb - g.vram_free_mb)
            self.gpu_memory_used.labels(**labels).set(used * MIB if g.available else 0)
            self.gpu_util.labels(**labels).set(g.util_pct / 100)
            self.gpu_available.labels(**labels).set(1 if g.schedulable else 0)
            if g.temperature_c is not None:
                self.gpu_temperature.labels(**labels).set(g.temperature_c)
