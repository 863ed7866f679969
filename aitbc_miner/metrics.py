"""Prometheus metric objects of the daemon (`aitbc_miner_*`).

Pure declarations on a per-daemon registry (tests create as many as they like);
exposition is prometheus_client's, served by health.py.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from . import __version__


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
