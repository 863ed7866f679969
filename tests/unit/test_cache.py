"""The on-node model cache (cache.py) with a counting fake download function."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import trio

from aitbc_miner.cache import ModelCache, fetch_input, open_cache
from aitbc_miner.errors import ErrorCode, JobFailure
from aitbc_miner.manifest import InputUrl
from aitbc_miner.metrics import Metrics

BLOBS = {name: (name * 300).encode() for name in ("a", "b", "c", "d")}  # 300 bytes each
SHA = {name: hashlib.sha256(data).hexdigest() for name, data in BLOBS.items()}


class Origin:
    """Stands in for the job's download function: writes the bytes and counts calls."""

    def __init__(self, *, gate: trio.Event | None = None, corrupt: bool = False) -> None:
        self.downloads: dict[str, int] = {}
        self.gate = gate
        self.corrupt = corrupt

    def for_(self, name: str, target: Path):
        async def download() -> int:
            self.downloads[name] = self.downloads.get(name, 0) + 1
            if self.gate is not None:
                await self.gate.wait()
            target.parent.mkdir(parents=True, exist_ok=True)
            data = BLOBS[name] + (b"!" if self.corrupt else b"")
            target.write_bytes(data)
            return len(data)

        return download


def make_cache(tmp_path: Path, max_bytes: int = 10_000, **kw) -> ModelCache:
    return ModelCache(tmp_path / "cache", max_bytes=max_bytes, **kw)


async def fetch(cache: ModelCache, origin: Origin, name: str, job_dir: Path) -> str:
    target = job_dir / "input" / "models" / f"{name}.bin"
    return await cache.provide(SHA[name], target, origin.for_(name, target), max_bytes=1 << 20)


async def test_second_job_is_served_from_the_cache_by_hard_link(tmp_path):
    metrics = Metrics()
    cache = make_cache(tmp_path, metrics=metrics)
    origin = Origin()
    assert await fetch(cache, origin, "a", tmp_path / "j1") == "miss"
    assert await fetch(cache, origin, "a", tmp_path / "j2") == "hit"
    assert origin.downloads == {"a": 1}
    served = tmp_path / "j2" / "input" / "models" / "a.bin"
    assert served.read_bytes() == BLOBS["a"]
    entry = tmp_path / "cache" / "models" / SHA["a"]
    assert os.path.samefile(served, entry)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o444
    value = metrics.registry.get_sample_value
    assert value("aitbc_miner_cache_hits_total") == 1
    assert value("aitbc_miner_cache_misses_total") == 1
    assert value("aitbc_miner_cache_download_bytes_total") == 300
    assert value("aitbc_miner_cache_bytes") == 300


async def test_copy_fallback_gives_the_job_its_own_read_only_file(tmp_path):
    cache = make_cache(tmp_path, link=False)
    origin = Origin()
    await fetch(cache, origin, "a", tmp_path / "j1")
    assert await fetch(cache, origin, "a", tmp_path / "j2") == "hit"
    served = tmp_path / "j2" / "input" / "models" / "a.bin"
    assert not os.path.samefile(served, tmp_path / "cache" / "models" / SHA["a"])
    assert served.read_bytes() == BLOBS["a"]
    assert stat.S_IMODE(served.stat().st_mode) == 0o444


async def test_concurrent_jobs_wanting_the_same_entry_download_it_once(tmp_path):
    cache = make_cache(tmp_path)
    gate = trio.Event()
    origin = Origin(gate=gate)
    results: list[str] = []

    async def job(n: int) -> None:
        results.append(await fetch(cache, origin, "a", tmp_path / f"j{n}"))

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(job, n)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert origin.downloads == {"a": 1}
    assert sorted(results) == ["hit", "hit", "hit", "miss"]
    for n in range(4):
        assert (tmp_path / f"j{n}" / "input" / "models" / "a.bin").read_bytes() == BLOBS["a"]


async def test_lru_eviction_respects_pins(tmp_path):
    metrics = Metrics()
    cache = make_cache(tmp_path, max_bytes=700, pinned=[SHA["a"]], metrics=metrics)
    origin = Origin()
    await fetch(cache, origin, "a", tmp_path / "j1")  # pinned, and the oldest
    await fetch(cache, origin, "b", tmp_path / "j2")
    await fetch(cache, origin, "c", tmp_path / "j3")  # 900 > 700: evict LRU unpinned = b
    assert SHA["a"] in cache and SHA["c"] in cache and SHA["b"] not in cache
    assert await fetch(cache, origin, "a", tmp_path / "j4") == "hit"
    assert await fetch(cache, origin, "b", tmp_path / "j5") == "miss"  # evicts c now
    assert SHA["c"] not in cache
    assert origin.downloads == {"a": 1, "b": 2, "c": 1}
    assert metrics.registry.get_sample_value("aitbc_miner_cache_evictions_total") == 2
    # the evicted entry's bytes survive in the job that linked it
    assert (tmp_path / "j2" / "input" / "models" / "b.bin").read_bytes() == BLOBS["b"]


async def test_recently_used_entries_survive_eviction(tmp_path):
    cache = make_cache(tmp_path, max_bytes=700)
    origin = Origin()
    await fetch(cache, origin, "a", tmp_path / "j1")
    await fetch(cache, origin, "b", tmp_path / "j2")
    await fetch(cache, origin, "a", tmp_path / "j3")  # a is now the most recent
    await fetch(cache, origin, "c", tmp_path / "j4")
    assert SHA["a"] in cache and SHA["b"] not in cache


async def test_no_room_because_of_pins_serves_uncached(tmp_path):
    cache = make_cache(tmp_path, max_bytes=500, pinned=[SHA["a"]])
    origin = Origin()
    await fetch(cache, origin, "a", tmp_path / "j1")
    assert await fetch(cache, origin, "b", tmp_path / "j2") == "uncached"
    assert (tmp_path / "j2" / "input" / "models" / "b.bin").read_bytes() == BLOBS["b"]
    assert SHA["b"] not in cache and SHA["a"] in cache


async def test_entry_larger_than_the_cap_is_not_cached(tmp_path):
    cache = make_cache(tmp_path, max_bytes=100)
    assert await fetch(cache, Origin(), "a", tmp_path / "j1") == "uncached"
    assert cache.size == 0


async def test_download_with_the_wrong_bytes_is_refused_and_not_cached(tmp_path):
    cache = make_cache(tmp_path)
    with pytest.raises(JobFailure) as info:
        await fetch(cache, Origin(corrupt=True), "a", tmp_path / "j1")
    assert info.value.code is ErrorCode.INPUT
    assert SHA["a"] not in cache


async def test_an_entry_changed_through_a_link_is_dropped_and_fetched_again(tmp_path):
    cache = make_cache(tmp_path)
    origin = Origin()
    await fetch(cache, origin, "a", tmp_path / "j1")
    linked = tmp_path / "j1" / "input" / "models" / "a.bin"
    os.chmod(linked, 0o644)  # a job with the daemon's uid can do this...
    with open(linked, "r+b") as fh:
        fh.write(b"X")  # ...and write through the shared inode
    assert await fetch(cache, origin, "a", tmp_path / "j2") == "miss"
    assert origin.downloads == {"a": 2}
    assert (tmp_path / "j2" / "input" / "models" / "a.bin").read_bytes() == BLOBS["a"]


async def test_hit_larger_than_the_jobs_input_cap_is_refused(tmp_path):
    cache = make_cache(tmp_path)
    origin = Origin()
    await fetch(cache, origin, "a", tmp_path / "j1")
    target = tmp_path / "j2" / "input" / "a.bin"
    with pytest.raises(JobFailure):
        await cache.provide(SHA["a"], target, origin.for_("a", target), max_bytes=100)


async def test_index_survives_a_restart_and_orphans_are_removed(tmp_path):
    cache = make_cache(tmp_path, max_bytes=700)
    origin = Origin()
    await fetch(cache, origin, "a", tmp_path / "j1")
    await fetch(cache, origin, "b", tmp_path / "j2")
    models = tmp_path / "cache" / "models"
    (models / SHA["d"]).write_bytes(BLOBS["d"])  # stored but never indexed (crash)
    (models / ".tmp" / "partial").write_bytes(b"x")
    reopened = make_cache(tmp_path, max_bytes=700)
    assert SHA["a"] in reopened and SHA["b"] in reopened and SHA["d"] not in reopened
    assert not (models / SHA["d"]).exists() and not (models / ".tmp" / "partial").exists()
    assert await fetch(reopened, origin, "a", tmp_path / "j3") == "hit"
    assert json.loads((models / "index.json").read_text())["version"] == 1
    smaller = make_cache(tmp_path, max_bytes=300)  # the cap shrank: evict down to it
    assert smaller.size <= 300 and SHA["a"] in smaller  # a was used last


async def test_fetch_input_routes_by_cache_flag_and_sha(tmp_path):
    cache = make_cache(tmp_path)
    origin = Origin()
    url = "http://127.0.0.1:9/files/a"

    async def run(job: str, **spec) -> None:
        s = InputUrl(url=url, path="a.bin", **spec)
        target = tmp_path / job / "input" / "a.bin"
        await fetch_input(cache, s, target, origin.for_("a", target), default_max_mb=1)

    await run("j1", sha256=SHA["a"])  # not marked: plain download
    await run("j2", cache=True)  # marked but no sha256: uncached, with a warning
    assert cache.size == 0 and origin.downloads == {"a": 2}
    await run("j3", cache=True, sha256=SHA["a"])
    await run("j4", cache=True, sha256=SHA["a"])
    assert origin.downloads == {"a": 3}
    target = tmp_path / "j5" / "input" / "a.bin"
    await fetch_input(
        None,
        InputUrl(url=url, path="a.bin", cache=True, sha256=SHA["a"]),
        target,
        origin.for_("a", target),
        default_max_mb=1,
    )  # no cache on this node: plain download
    assert origin.downloads == {"a": 4}


def test_open_cache_on_an_unusable_root_disables_the_cache(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert open_cache(blocker, 1.0, (), None) is None
    assert open_cache(tmp_path / "ok", 1.0, (), None) is not None
