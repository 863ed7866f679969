"""On-node model cache: `<cache.root>/models/<sha256>`, so a model is downloaded once per node.

I/O: filesystem. Entries are addressed by the sha256 a manifest gives for an
input marked `"cache": true`; they are filled by the daemon (through whatever
download function the job would have used, then hashed again before they are
adopted), kept under a size cap (`cache.max_gb`) with LRU eviction that never
evicts `cache.pinned` entries, and exposed to a job as a hard link (same
filesystem; mode 0444) or, where linking fails, a private copy. Concurrent
jobs wanting the same entry wait on one per-key lock, so it is fetched once.

An entry whose size or mtime changed since it was stored (someone wrote
through a link) is dropped and fetched again. Jobs run as the daemon's user,
so the read-only mode guards against accidents, not against a hostile job.
A `cache: true` input without a sha256 cannot be addressed: it is fetched
uncached (with a warning), never refused — `cache` is a miner-side hint.
It must not: decide anything about a job besides where an input's bytes come
from, or share a cache directory between two daemons.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from .errors import ErrorCode, JobFailure
from .journal import write_atomic
from .manifest import SHA256_RE, InputUrl

log = structlog.get_logger(__name__)

MIB = 1024 * 1024
GIB = 1024 * MIB
INDEX = "index.json"
INDEX_VERSION = 1
_LINK_FALLBACK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.EACCES}

Download = Callable[[], Awaitable[Any]]


@dataclass
class Entry:
    size: int
    mtime_ns: int
    used_seq: int  # LRU order: higher is more recent
    last_used: float  # wall clock, for people


class ModelCache:
    """The cache directory and its index; one instance per daemon."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int,
        pinned: Iterable[str] = (),
        metrics: Any = None,
        link: bool = True,
    ) -> None:
        self.dir = Path(root) / "models"
        self.tmp = self.dir / ".tmp"
        self.max_bytes = max_bytes
        self.pinned = frozenset(pinned)
        self.metrics = metrics
        self.link = link
        self._entries: dict[str, Entry] = {}
        self._seq = 0
        self._mutex = threading.Lock()  # index changes happen in worker threads
        self._keys: dict[str, tuple[trio.Lock, int]] = {}  # sha -> (lock, waiters)
        self._open()

    # -- start-up ------------------------------------------------------------------------

    def _open(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(mode=0o700)
        try:
            data = json.loads((self.dir / INDEX).read_text())
            raw = data["entries"] if data.get("version") == INDEX_VERSION else {}
        except (OSError, ValueError, KeyError, TypeError):
            raw = {}
        for sha, fields in raw.items() if isinstance(raw, dict) else ():
            try:
                entry = Entry(**fields)
            except TypeError:
                continue
            if SHA256_RE.fullmatch(sha) and self._intact(sha, entry):
                self._entries[sha] = entry
                self._seq = max(self._seq, entry.used_seq)
        orphans = 0
        for path in self.dir.iterdir():
            if path.name not in self._entries and path.name not in (INDEX, ".tmp"):
                orphans += 1  # a crash between storing and indexing: fetch it again
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        with self._mutex:
            self._evict_for(0)
            self._save()
        log.info(
            "cache_opened",
            root=str(self.dir),
            entries=len(self._entries),
            bytes=self.size,
            max_bytes=self.max_bytes,
            pinned=len(self.pinned),
            orphans_removed=orphans,
        )

    @property
    def size(self) -> int:
        return sum(e.size for e in self._entries.values())

    def __contains__(self, sha: str) -> bool:
        return sha in self._entries

    def _path(self, sha: str) -> Path:
        return self.dir / sha

    def _intact(self, sha: str, entry: Entry) -> bool:
        try:
            st = os.stat(self._path(sha), follow_symlinks=False)
        except OSError:
            return False
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_size == entry.size
            and st.st_mtime_ns == entry.mtime_ns
        )

    # -- the one operation jobs use -----------------------------------------------------

    async def provide(self, sha: str, target: Path, download: Download, *, max_bytes: int) -> str:
        """Put the input `sha` at `target`: from the cache, or by `download()` then store it.

        Returns "hit", "miss" (downloaded and stored) or "uncached" (downloaded,
        but it could not be stored: too large, or the cap is all pinned).
        """
        lock = self._acquire_key(sha)
        try:
            async with lock:
                placed = await trio.to_thread.run_sync(self._serve_hit, sha, target, max_bytes)
                if placed:
                    self._count("cache_hits")
                    log.info("cache_hit", sha256=sha, path=str(target.name))
                    return "hit"
                self._count("cache_misses")
                await download()
                stored = await trio.to_thread.run_sync(self._adopt, sha, target)
                return "miss" if stored else "uncached"
        finally:
            self._release_key(sha)

    def _acquire_key(self, sha: str) -> trio.Lock:
        lock, waiters = self._keys.get(sha, (None, 0))
        lock = lock or trio.Lock()
        self._keys[sha] = (lock, waiters + 1)
        return lock

    def _release_key(self, sha: str) -> None:
        lock, waiters = self._keys[sha]
        if waiters <= 1:
            del self._keys[sha]
        else:
            self._keys[sha] = (lock, waiters - 1)

    def _count(self, name: str, amount: float = 1) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).inc(amount)

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.cache_bytes.set(self.size)
            self.metrics.cache_entries.set(len(self._entries))

    # -- worker-thread parts ----------------------------------------------------------

    def _serve_hit(self, sha: str, target: Path, max_bytes: int) -> bool:
        with self._mutex:  # an entry cannot be evicted between the check and the link/open
            entry = self._entries.get(sha)
            if entry is None:
                return False
            if not self._intact(sha, entry):
                log.warning("cache_entry_changed", sha256=sha)
                self._drop(sha)
                self._save()
                return False
            if entry.size > max_bytes:
                raise JobFailure(
                    ErrorCode.INPUT, f"input {target.name}: larger than {max_bytes // MIB} MiB"
                )
            self._seq += 1
            entry.used_seq, entry.last_used = self._seq, time.time()
            self._save()
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.link and _try_link(self._path(sha), target):
                return True
            src = os.open(self._path(sha), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:  # the copy runs outside the lock: the open fd keeps the bytes even if evicted
            _copy_fd(src, target)
        finally:
            os.close(src)
        os.chmod(target, 0o444)
        return True

    def _adopt(self, sha: str, target: Path) -> bool:
        """Store the freshly downloaded `target` as entry `sha` (after checking its hash)."""
        st = os.stat(target, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise JobFailure(ErrorCode.INPUT, f"input {target.name}: not a regular file")
        if _sha256_file(target) != sha:
            raise JobFailure(ErrorCode.INPUT, f"input {target.name}: sha256 mismatch")
        self._count("cache_download_bytes", st.st_size)
        with self._mutex:
            if st.st_size > self.max_bytes or not self._evict_for(st.st_size):
                log.warning(
                    "cache_no_room",
                    sha256=sha,
                    size=st.st_size,
                    max_bytes=self.max_bytes,
                    pinned_bytes=sum(e.size for s, e in self._entries.items() if s in self.pinned),
                )
                return False
            tmp = self.tmp / f"{sha}.{os.getpid()}.{threading.get_ident()}"
            _place(target, tmp, link=self.link)
            os.chmod(tmp, 0o444)
            os.replace(tmp, self._path(sha))
            final = os.stat(self._path(sha), follow_symlinks=False)
            self._seq += 1
            self._entries[sha] = Entry(final.st_size, final.st_mtime_ns, self._seq, time.time())
            self._save()
        log.info("cache_stored", sha256=sha, size=st.st_size, bytes=self.size)
        return True

    def _evict_for(self, need: int) -> bool:
        """Evict least recently used, unpinned entries until `need` more bytes fit.

        Safe while jobs use them: a job's hard link or open copy keeps its bytes.
        """
        lru = sorted(
            (s for s in self._entries if s not in self.pinned),
            key=lambda s: self._entries[s].used_seq,
        )
        total = self.size
        for sha in lru:
            if total + need <= self.max_bytes:
                break
            total -= self._entries[sha].size
            log.info("cache_evicted", sha256=sha, size=self._entries[sha].size)
            self._drop(sha)
            self._count("cache_evictions")
        return total + need <= self.max_bytes

    def _drop(self, sha: str) -> None:
        # A job holding a hard link keeps its copy of the bytes; only our name goes.
        self._entries.pop(sha, None)
        self._path(sha).unlink(missing_ok=True)

    def _save(self) -> None:
        payload = {
            "version": INDEX_VERSION,
            "entries": {sha: asdict(e) for sha, e in self._entries.items()},
        }
        write_atomic(self.dir / INDEX, json.dumps(payload, sort_keys=True).encode())
        self._gauges()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(4 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _try_link(source: Path, dest: Path) -> bool:
    try:
        os.link(source, dest, follow_symlinks=False)
        return True
    except OSError as exc:
        if exc.errno not in _LINK_FALLBACK:
            raise
        return False


def _copy_fd(src_fd: int, dest: Path) -> None:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        while chunk := os.read(src_fd, 4 * MIB):
            out.write(chunk)


def _place(source: Path, dest: Path, *, link: bool) -> None:
    """`dest` becomes `source`'s bytes: a hard link when possible, else a copy."""
    if link and _try_link(source, dest):
        return
    src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _copy_fd(src, dest)
    finally:
        os.close(src)


# -- glue for jobs/ --------------------------------------------------------------------------


def open_cache(root: Path, max_gb: float, pinned: Iterable[str], metrics: Any) -> ModelCache | None:
    """The daemon's cache, or None (logged) when its directory cannot be used."""
    try:
        return ModelCache(root, max_bytes=int(max_gb * GIB), pinned=pinned, metrics=metrics)
    except OSError as exc:
        log.error("cache_disabled", root=str(root), error=f"{exc.strerror}: {exc.filename}")
        return None


async def fetch_input(
    cache: ModelCache | None,
    spec: InputUrl,
    target: Path,
    download: Download,
    *,
    default_max_mb: int,
) -> None:
    """Materialise one URL input at `target`, through the cache when it asks for it."""
    if cache is None or not spec.cache:
        await download()
        return
    if spec.sha256 is None:
        log.warning("cache_input_without_sha256", path=spec.path)
        await download()
        return
    max_bytes = (spec.max_mb or default_max_mb) * MIB
    await cache.provide(spec.sha256, target, download, max_bytes=max_bytes)
