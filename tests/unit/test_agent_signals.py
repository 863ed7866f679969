"""A stop signal that arrives before the event loop listens still drains cleanly."""

from __future__ import annotations

import signal

import httpx
import trio

from aitbc_miner.agent import Agent
from aitbc_miner.allowlist import load_allowlist
from tests.support.agentcfg import agent_config


def make_agent(tmp_path, early: list[int], calls: list[str]) -> Agent:
    cfg = agent_config(
        tmp_path,
        AITBC_MINER_NODE_ID="node-sig",
        AITBC_MINER_RESOURCES__CGROUP="off",
        AITBC_MINER_GPU__ENABLE="false",
    )

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(503)

    return Agent(
        cfg, load_allowlist([]), transport=httpx.MockTransport(handler), early_signals=early
    )


async def test_early_sigterm_stops_before_registering(tmp_path):
    calls: list[str] = []
    agent = make_agent(tmp_path, [signal.SIGTERM], calls)
    with trio.fail_after(10):  # a hang here would mean the remembered signal was lost
        await agent.run()
    assert agent.draining is True
    assert not agent.client.registered
    assert all(not path.endswith("/jobs/pull") for path in calls)


async def test_without_a_signal_it_keeps_trying_to_register(tmp_path):
    calls: list[str] = []
    agent = make_agent(tmp_path, [], calls)
    with trio.move_on_after(2):  # the control: the same agent does not stop by itself
        await agent.run()
    assert any(path.endswith("/nodes/register") for path in calls)
    assert agent.draining is False
