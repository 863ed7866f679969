"""Shared fixtures: a real mock coordinator process and real miner processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.minerproc import MinerProcess, start_miner
from tests.support.mockproc import MockCoordinator, start_mock

# A test-only allowlist: /bin/sh with free-form scripts, to build jobs that
# misbehave on purpose (grandchildren, exit codes, markers). Never shipped.
TEST_ALLOWLIST = """
name: sh
command:
  path: "/bin/sh"
args:
  - ["-c", ".{1,4000}"]
  - [".{0,200}"]
env: ["JOB_.*"]
max_runtime_s: 120
max_output_mb: 1024
"""

# A deliberately narrow entry: only `touch allowed-marker` may run.
NARROW_ALLOWLIST = """
name: narrow
command:
  path: "/usr/bin/touch"
args:
  - ["allowed-marker"]
"""


@pytest.fixture
async def forkserver():
    """A real fork server (sandbox/forkserver.py) for the test's trio loop."""
    from aitbc_miner.sandbox.spawner import ForkServer

    server = ForkServer()
    await server.open()
    try:
        yield server
    finally:
        await server.aclose()


@pytest.fixture
def mock(tmp_path: Path) -> Iterator[MockCoordinator]:
    coordinator = start_mock(tmp_path / "mock")
    try:
        yield coordinator
    finally:
        coordinator.stop()


@pytest.fixture
def test_allowlist(tmp_path: Path) -> str:
    d = tmp_path / "allowlist.test.d"
    d.mkdir()
    (d / "sh.yaml").write_text(TEST_ALLOWLIST)
    (d / "narrow.yaml").write_text(NARROW_ALLOWLIST)
    repo_allowlist = Path(__file__).resolve().parents[1] / "allowlist.d" / "*.yaml"
    return f'["{d}/*.yaml", "{repo_allowlist}"]'


@pytest.fixture
def miner_factory(tmp_path: Path, test_allowlist: str) -> Iterator[Callable[..., MinerProcess]]:
    started: list[MinerProcess] = []

    def factory(mock: Any, **overrides: Any) -> MinerProcess:
        overrides.setdefault("AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES", test_allowlist)
        miner = start_miner(tmp_path, mock, **overrides)
        started.append(miner)
        return miner

    yield factory
    for miner in started:
        miner.stop()


@pytest.fixture
def miner(mock: MockCoordinator, miner_factory: Callable[..., MinerProcess]) -> MinerProcess:
    return miner_factory(mock)
