"""Credentials never leave memory: a full job cycle with known secret strings, then a
grep of everything the miner wrote or served; and node-token renewal before expiry.

The bootstrap token and the HMAC key are chosen here; node tokens are minted by the
mock and read back from its --state-file (the mock persists its token table there).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
from pathlib import Path
from typing import Any

import httpx

from tests.security._e2e import cli_job, last_fail, wait_final
from tests.support.minerproc import REPO
from tests.support.mockproc import start_mock
from tests.support.wait import wait_for

# A python task that shows the job what its environment is: dumped to an artifact
# and to stdout (so also into logs/exec.log).
ENV_TASK = """
import json, os

def run():
    env = dict(os.environ)
    print(json.dumps(env), flush=True)
    with open(os.path.join(os.environ["AITBC_OUTPUT_DIR"], "env.json"), "w") as fh:
        json.dump(env, fh)
    return {"keys": sorted(env)}
"""

JOB_ENV_ALLOWED = {
    "PATH", "HOME", "TMPDIR", "LANG", "AITBC_JOB_ID", "AITBC_ATTEMPT", "AITBC_INPUT_DIR",
    "AITBC_OUTPUT_DIR", "AITBC_WORK_DIR",
    "PWD", "SHLVL", "_",  # added by /bin/sh itself
}  # fmt: skip


def node_tokens(state_file: Path) -> list[str]:
    state = json.loads(state_file.read_text())
    return list(state["nodes"]["tokens"])


def tree_bytes(root: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path)] = path.read_bytes()
    return out


def leaks(secrets_: dict[str, str], sources: dict[str, bytes]) -> list[str]:
    return [
        f"{name} found in {where}"
        for name, value in secrets_.items()
        for where, data in sources.items()
        if value.encode() in data
    ]


def test_no_secret_in_workspace_logs_endpoints_or_job_env(tmp_path: Path, miner_factory):
    bootstrap = "boot-" + secrets.token_hex(12)
    hmac_key = "hmac-" + secrets.token_hex(12)
    state_file = tmp_path / "mock-state" / "state.json"
    state_file.parent.mkdir()
    mock = start_mock(
        tmp_path / "mock",
        "--bootstrap-token", bootstrap, "--hmac-secret", hmac_key,
        "--state-file", str(state_file),
    )  # fmt: skip
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "envdump.py").write_text(ENV_TASK)
    log_file = tmp_path / "miner.jsonl"
    try:
        miner = miner_factory(
            mock,
            MINER_AUTH=bootstrap,
            MINER_HMAC=hmac_key,
            AITBC_MINER_SECURITY__HMAC_KEYS=json.dumps({"mock-hmac": "env:MINER_HMAC"}),
            AITBC_MINER_RUNNERS__PYTHON__TASK_PATHS=json.dumps(
                [str(REPO / "aitbc_miner" / "tasks"), str(tasks)]
            ),
            AITBC_MINER_LOGGING__PATH=str(log_file),
        )
        data = b"input bytes\n"
        url = mock.admin.add_file("in/data.txt", data)["url"]
        dump = "env > env.txt; cat /proc/self/environ > environ.bin; cat input.txt"
        mock.admin.enqueue_many(
            [
                cli_job(
                    "k-ok", "sh", ["-c", dump],
                    input={"urls": [{"url": url, "path": "input.txt",
                                     "sha256": hashlib.sha256(data).hexdigest()}]},
                    artifacts=[{"path": "env.txt"}, {"path": "environ.bin"}],
                ),
                cli_job("k-fail", "sh", ["-c", "env; env >&2; exit 3"]),
                {"job_id": "k-py", "runner": "python", "timeout_s": 60, "task": "envdump",
                 "artifacts": [{"path": "env.json"}, {"path": "result.json"}]},
                cli_job("k-deny", "rm", ["-rf", "/"]),
            ],
            sign="hmac",
            retry=False,
        )  # fmt: skip
        mock.admin.enqueue(cli_job("k-badsig", "sh", ["-c", "env"]), sign="bad", retry=False)
        jobs = {j: wait_final(mock, j) for j in ("k-ok", "k-fail", "k-py", "k-deny", "k-badsig")}
        assert jobs["k-ok"]["state"] == "succeeded", jobs["k-ok"]
        assert jobs["k-py"]["state"] == "succeeded", jobs["k-py"]
        assert last_fail(jobs["k-fail"])["error_code"] == "E_EXIT"
        assert last_fail(jobs["k-deny"])["error_code"] == "E_DENY"
        assert last_fail(jobs["k-badsig"])["error_code"] == "E_SIGNATURE"
        assert "PATH=" in last_fail(jobs["k-fail"])["logs_tail"]  # the env did reach the report

        health = miner.health_url
        served = {
            f"GET {path}": httpx.get(f"{health}/{path}", timeout=5).content
            for path in ("healthz", "readyz", "metrics")
        }
        artifacts = {
            f"artifact {job}/{path}": mock.admin.artifact(job, path)
            for job, path in (("k-ok", "env.txt"), ("k-ok", "environ.bin"),
                              ("k-py", "env.json"), ("k-py", "result.json"))
        }  # fmt: skip
        env_json = json.loads(artifacts["artifact k-py/env.json"])
        assert set(env_json) <= JOB_ENV_ALLOWED, sorted(set(env_json) - JOB_ENV_ALLOWED)
        env_txt = artifacts["artifact k-ok/env.txt"].decode()
        names = {line.split("=", 1)[0] for line in env_txt.splitlines() if "=" in line}
        assert names <= JOB_ENV_ALLOWED, sorted(names - JOB_ENV_ALLOWED)
        reports = {f"fail/result reports of {j}": json.dumps(rec).encode()
                   for j, rec in jobs.items()}  # fmt: skip
        assert mock.admin.stats()["downloads"]["in/data.txt"]["with_auth"] == 0
        # Positive control: the daemon's own environment does hold the secrets, so the
        # grep below would find them if any of it leaked into a job or a file.
        daemon_environ = Path(f"/proc/{miner.proc.pid}/environ").read_bytes()
        assert bootstrap.encode() in daemon_environ and hmac_key.encode() in daemon_environ
        assert miner.stop() == 0  # deregisters: its shutdown lines are grepped too

        tokens = node_tokens(state_file)
        assert tokens, "the mock issued no node token"
        known = {"bootstrap token": bootstrap, "hmac key": hmac_key}
        known.update({f"node token #{i}": t for i, t in enumerate(tokens)})
        sources: dict[str, bytes] = {
            **tree_bytes(tmp_path / "ws"),  # state.json, manifest.json, task.json, logs, ...
            "miner stdout/stderr": miner.log_path.read_bytes(),
            "logging.path file": log_file.read_bytes(),
            **served,
            **artifacts,
            **reports,
        }
        workspace_files = [p for p in sources if p.startswith(str(tmp_path / "ws"))]
        for expected in ("state.json", "manifest.json", "task.json", "exec.log"):
            assert any(p.endswith(expected) for p in workspace_files), expected
        assert sum(1 for e in miner.events() if e.get("event") == "job_finished") == 5
        assert leaks(known, sources) == []
    finally:
        mock.stop()


def register_times(node: dict[str, Any]) -> list[float]:
    return [c["ts"] for c in node["calls"] if c["endpoint"] == "nodes/register"]


def test_node_token_is_renewed_before_it_expires(tmp_path: Path, miner_factory):
    ttl = 8.0  # with a 1 s heartbeat the miner renews once fewer than 7 s are left
    mock = start_mock(tmp_path / "mock", "--token-ttl-s", str(ttl))
    try:
        miner = miner_factory(mock)
        # A job that outlives the first token: it must finish without any 401.
        mock.admin.enqueue(cli_job("long", "sh", ["-c", "sleep 3; echo done"]), retry=False)
        node = wait_for(
            lambda: (n := mock.admin.node(miner.node_id))["registrations"] >= 4 and n,
            timeout=30,
            what="three token renewals",
        )
        assert wait_final(mock, "long")["state"] == "succeeded"
        node = mock.admin.node(miner.node_id)
        unauthorized = [c for c in node["calls"] if c["status"] == 401]
        assert unauthorized == [], unauthorized
        times = register_times(node)
        assert all(b - a < ttl for a, b in itertools.pairwise(times)), times
        assert len(miner.find("node_token_renewing")) >= 3
        assert miner.find("node_token_rejected") == []
        assert node["violations"] == 0
    finally:
        mock.stop()
