"""All in-memory state of the mock in one value: nodes, jobs, idempotency records, upload
metadata, served files and counters, with JSON (de)serialisation for --state-file.
Pure apart from `save`/`load`, which read and atomically write the state file."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from .common import ApiError, atomic_write
from .jobs import JobBoard
from .nodes import NodeBook


@dataclasses.dataclass
class Upload:
    upload_id: str
    job_id: str  # internal job id
    attempt: int
    node_id: str
    path: str
    size: int
    sha256: str
    chunk_size: int
    created_at: float
    received: int = 0
    complete: bool = False
    puts: int = 0  # every PUT that named this upload, whatever its fate
    bytes_put_total: int = 0  # every body byte those PUTs carried, rejected ones included
    rejected_puts: int = 0
    resets: int = 0  # sha256 mismatches at completion

    def status(self) -> dict[str, Any]:
        return {"received": self.received, "size": self.size, "complete": self.complete}


class UploadBook:
    def __init__(self) -> None:
        self.uploads: dict[str, Upload] = {}

    def start(
        self,
        job_id: str,
        attempt: int,
        node_id: str,
        path: str,
        size: int,
        sha256: str,
        chunk_size: int,
        now: float,
    ) -> Upload:
        """The upload for (job, attempt, path, sha256): the existing one, or a new one."""
        for up in self.uploads.values():
            if (up.job_id, up.attempt, up.path, up.sha256) == (job_id, attempt, path, sha256):
                if up.size != size:
                    raise ApiError(
                        422,
                        "size differs from the existing upload of this file",
                        upload_id=up.upload_id,
                        size=up.size,
                    )
                return up
        up = Upload(
            upload_id="up-" + uuid.uuid4().hex,
            job_id=job_id,
            attempt=attempt,
            node_id=node_id,
            path=path,
            size=size,
            sha256=sha256,
            chunk_size=chunk_size,
            created_at=now,
        )
        self.uploads[up.upload_id] = up
        return up

    def get(self, upload_id: str) -> Upload | None:
        return self.uploads.get(upload_id)


class Idempotency:
    """First answers by (node, endpoint, Idempotency-Key), with the request fingerprint."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    def lookup(self, scope: str, fingerprint: str) -> dict[str, Any] | None:
        record = self.records.get(scope)
        if record is not None and record["fingerprint"] != fingerprint:
            raise ApiError(422, "idempotency key reused with a different request")
        return record

    def store(self, scope: str, fingerprint: str, status: int, body: Any, now: float) -> None:
        self.records[scope] = {
            "fingerprint": fingerprint,
            "status": status,
            "body": body,
            "ts": now,
        }


class Stats:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # "endpoint status" -> count
        self.faults: Counter[str] = Counter()  # fault kind -> count
        self.upload_bytes = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": dict(self.requests),
            "faults": dict(self.faults),
            "upload_bytes": self.upload_bytes,
        }

    def load_json(self, data: dict[str, Any]) -> None:
        self.requests = Counter(data.get("requests", {}))
        self.faults = Counter(data.get("faults", {}))
        self.upload_bytes = data.get("upload_bytes", 0)


class State:
    def __init__(
        self, *, lease_s: float, max_attempts: int, token_ttl_s: float, pending_by_default: bool
    ) -> None:
        self.nodes = NodeBook(token_ttl_s, pending_by_default)
        self.jobs = JobBoard(lease_s, max_attempts)
        self.uploads = UploadBook()
        self.idempotency = Idempotency()
        # name -> {"name", "size", "sha256", "fail_times", "status", "retry_after",
        #          "content_type", "requests", "downloads", "failed", "with_auth"}
        self.files: dict[str, dict[str, Any]] = {}
        self.stats = Stats()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "nodes": self.nodes.to_json(),
            "jobs": self.jobs.to_json(),
            "uploads": [dataclasses.asdict(u) for u in self.uploads.uploads.values()],
            "idempotency": self.idempotency.records,
            "files": self.files,
            "stats": self.stats.to_json(),
        }

    def load_json(self, data: dict[str, Any]) -> None:
        self.nodes.load_json(data.get("nodes", {}))
        self.jobs.load_json(data.get("jobs", {}))
        self.uploads.uploads = {u["upload_id"]: Upload(**u) for u in data.get("uploads", [])}
        self.idempotency.records = dict(data.get("idempotency", {}))
        self.files = dict(data.get("files", {}))
        self.stats.load_json(data.get("stats", {}))

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.to_json(), ensure_ascii=False).encode())

    def load(self, path: Path) -> bool:
        """Load `path` if it exists; return whether it did."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return False
        self.load_json(json.loads(raw))
        return True
