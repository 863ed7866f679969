"""Daemon-level fuzz: the whole Agent under trio against a tiny fake coordinator
(httpx.MockTransport) whose pulls hand out hostile replies.

Each example scripts a handful of pull replies: garbage bodies (invalid JSON, wrong
types, 10 MB), jobs without a lease, and invalid manifests built from a runnable
`touch` job with fields made hostile, signed with the pinned key or not. Property:
the daemon never crashes, reports E_INVALID (E_SIGNATURE when unsigned or badly
signed) for every identifiable bad manifest, never reports anything else, never
uploads a result, and never executes a job (no marker appears).
"""

from __future__ import annotations

import atexit
import base64
import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import event, given
from hypothesis import strategies as st

from aitbc_miner.agent import Agent
from aitbc_miner.allowlist import load_allowlist
from aitbc_miner.errors import JobFailure
from aitbc_miner.manifest import JOB_ID_RE, job_identity, parse_manifest
from aitbc_miner.security import canonical_bytes
from tests.fuzz.profile import budget, seen
from tests.fuzz.strategies import json_values, manifests
from tests.support.agentcfg import agent_config

REPO = Path(__file__).resolve().parents[2]
SCRATCH = Path(tempfile.mkdtemp(prefix="aitbc-fuzz-daemon-"))
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
KEY = Ed25519PrivateKey.generate()
PUB = base64.b64encode(KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
ALLOWLIST = SCRATCH / "sh.yaml"
ALLOWLIST.write_text('command: {path: "/bin/sh"}\nargs: [["-c", ".{1,200}"]]\nenv: ["JOB_.*"]\n')
RUNNABLE = {"runner": "cli", "timeout_s": 30, "command": "sh", "args": ["-c", "touch ran-marker"]}
BIG = b'{"job": null, "x": "' + b"y" * (10 * 1024 * 1024) + b'"}'
_examples = itertools.count()


@st.composite
def bad_job(draw: st.DrawFn) -> dict[str, Any]:
    """A runnable job with one to three fields made hostile, so it is invalid."""
    hostile = draw(manifests)
    job = {**RUNNABLE, "job_id": "placeholder"}
    keys = draw(st.lists(st.sampled_from(sorted(hostile)), min_size=1, max_size=3, unique=True))
    for key in keys:
        job[key] = hostile[key]
    if "job_id" not in keys:
        job.pop("job_id")  # a unique, valid id is assigned when the script is built
    return job


@st.composite
def pull_item(draw: st.DrawFn) -> tuple[str, Any]:
    kind = draw(st.sampled_from(["job", "job", "job", "garbage", "no-lease"]))
    if kind == "garbage":
        body = draw(st.one_of(
            st.binary(max_size=200),
            st.just(BIG),
            json_values.map(lambda v: json.dumps(v).encode()),
            st.fixed_dictionaries({"job": json_values, "lease": json_values})
            .map(lambda v: json.dumps(v).encode()),
        ))  # fmt: skip
        status = draw(st.sampled_from([200, 200, 500, 503, 429, 400]))
        return kind, (status, body)
    job = draw(bad_job())
    sign = draw(st.sampled_from(["good", "good", "good", "none", "garbage"]))
    return kind, (job, sign)


def bound_here(job: dict[str, Any]) -> bool:
    """Whether signed binding fields (PROTOCOL: node_id, not_after) let the job through."""
    return job.get("node_id") in (None, "node-fuzz") and job.get("not_after") is None


def script_from(items: list[tuple[str, Any]]) -> tuple[list[httpx.Response], dict[str, str]]:
    """Pull replies in order, and the error code expected for each reportable job."""
    replies: list[httpx.Response] = []
    expected: dict[str, str] = {}
    ids = (f"fz-{n}" for n in itertools.count())
    for kind, item in items:
        if kind == "garbage":
            status, body = item
            replies.append(httpx.Response(status, content=body))
            continue
        job, sign = item
        job = {"job_id": next(ids), **job} if "job_id" not in job else dict(job)
        ident = job_identity(job)
        if ident is not None and ident[0] in expected:
            continue  # one job per id: a second copy is not this property's business
        try:
            parse_manifest(job)
            if isinstance(job.get("job_id"), str) and JOB_ID_RE.fullmatch(job["job_id"]):
                continue  # still valid after mutation: not a bad manifest
        except JobFailure:
            pass
        signature = None
        if sign == "good":
            value = base64.b64encode(KEY.sign(canonical_bytes(job))).decode()
            signature = {"key_id": "k1", "alg": "ed25519", "value": value}
        elif sign == "garbage":
            signature = {"key_id": "k1", "alg": "ed25519", "value": base64.b64encode(
                b"\x00" * 64).decode()}  # fmt: skip
        lease = None if kind == "no-lease" else {"lease_id": f"lease-{len(replies)}"}
        body = {"job": job, "lease": lease, "signature": signature}
        replies.append(httpx.Response(200, content=json.dumps(body).encode()))
        if ident is not None and lease is not None:
            verified = sign == "good" and bound_here(job)
            expected[ident[0]] = "E_INVALID" if verified else "E_SIGNATURE"
    return replies, expected


class FakeCoordinator:
    def __init__(self, replies: list[httpx.Response]) -> None:
        self.replies = list(replies)
        self.fails: list[dict[str, Any]] = []
        self.results = 0
        self.changed = trio.Event()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        endpoint = request.url.path.removeprefix("/api/v1/")
        if endpoint == "nodes/register":
            return httpx.Response(200, json={"node_token": "tok", "status": "active"})
        if endpoint == "nodes/heartbeat":
            return httpx.Response(200, json={"status": "active", "cancel": []})
        if endpoint == "jobs/pull":
            if self.replies:
                reply = self.replies.pop(0)
                self._poke()
                return reply
            await trio.sleep(0.05)  # a short long-poll with nothing to hand out
            return httpx.Response(200, json={"job": None, "lease": None, "signature": None})
        if endpoint == "jobs/fail":
            self.fails.append(json.loads(request.content))
            self._poke()
        elif endpoint == "jobs/result":
            self.results += 1
            self._poke()
        elif endpoint == "jobs/progress":
            return httpx.Response(200, json={"cancel": False})
        return httpx.Response(200, json={})

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


def make_agent(root: Path, transport: httpx.MockTransport) -> Agent:
    cfg = agent_config(
        root,
        AITBC_MINER_NODE_ID="node-fuzz",
        AITBC_MINER_COORDINATOR__PULL_WAIT_S="1",
        AITBC_MINER_HEARTBEAT__INTERVAL_S="0.2",
        AITBC_MINER_HEARTBEAT__BACKOFF__MIN_S="0.01",
        AITBC_MINER_HEARTBEAT__BACKOFF__MAX_S="0.05",
        AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES=json.dumps([str(ALLOWLIST)]),
        AITBC_MINER_RUNNERS__PYTHON__TASK_PATHS=json.dumps([str(REPO / "aitbc_miner/tasks")]),
        AITBC_MINER_RUNNERS__PYTHON__VENV=str(REPO / ".venv"),
        AITBC_MINER_SECURITY__MANIFEST_KEYS=json.dumps({"k1": PUB}),
        AITBC_MINER_RESOURCES__CGROUP="off",
        AITBC_MINER_GPU__ENABLE="false",
        AITBC_MINER_SHUTDOWN__GRACE_S="2",
        AITBC_MINER_SHUTDOWN__KILL_GRACE_S="1",
        AITBC_MINER_LOGGING__LEVEL="error",
    )
    return Agent(cfg, load_allowlist(cfg.runners.cli.allowlist_files), transport=transport)


@budget(weight=0.05)
@given(items=st.lists(pull_item(), min_size=1, max_size=6))
def test_daemon_survives_hostile_pulls_and_reports_every_bad_manifest(
    items: list[tuple[str, Any]],
) -> None:
    seen("daemon-pull-reply", len(items))
    replies, expected = script_from(items)
    fake = FakeCoordinator(replies)
    root = SCRATCH / f"ex-{next(_examples)}"
    agent = make_agent(root, httpx.MockTransport(fake))

    def done() -> bool:
        reported = {f.get("job_id") for f in fake.fails}
        return not fake.replies and set(expected) <= reported and not agent.jobs

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)
            with trio.fail_after(60):
                while not done():
                    with trio.move_on_after(0.2):
                        await fake.changed.wait()
            agent.begin_drain("fuzz example done")

    trio.run(main)  # a crash of the daemon would raise here
    codes = {f["job_id"]: f["error_code"] for f in fake.fails}
    assert codes == expected, (codes, expected)
    assert all(f["retryable"] is False for f in fake.fails)
    assert fake.results == 0
    assert list(root.rglob("ran-marker")) == []
    for code in sorted(set(codes.values())) or ["nothing reportable"]:
        event(code)
