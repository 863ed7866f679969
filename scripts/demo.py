#!/usr/bin/env python3
"""`make demo`: the whole loop on loopback, in a temp directory under .demo/.

Starts the bundled mock coordinator and a miner with etc/config.dev.yaml,
enqueues sample jobs (CLI, Python task, one denied on purpose), waits for
them, and prints where the artifacts, logs, /healthz and /metrics are. Then
keeps both running until Ctrl-C (or exits at once with --once / no TTY).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]

SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog.\n" * 50
JOBS = [
    {
        "job_id": "demo-gzip",
        "runner": "cli",
        "timeout_s": 60,
        "command": "gzip",
        "args": ["-k", "-f", "-n", "-9", "fox.txt"],
        "input": {"inline": {"fox.txt": SAMPLE_TEXT}},
        "artifacts": [{"path": "fox.txt.gz", "type": "application/gzip", "max_mb": 1}],
    },
    {
        "job_id": "demo-python",
        "runner": "python",
        "timeout_s": 60,
        "task": "example",
        "params": {"input": "fox.txt", "transform": "upper", "output": "FOX.txt"},
        "input": {"inline": {"fox.txt": SAMPLE_TEXT}},
        "artifacts": [{"path": "FOX.txt", "type": "text/plain"}, {"path": "result.json"}],
    },
    {
        "job_id": "demo-sha256",
        "runner": "cli",
        "timeout_s": 60,
        "command": "sha256sum",
        "args": ["--tag", "fox.txt"],
        "input": {"inline": {"fox.txt": SAMPLE_TEXT}},
    },
    {
        "job_id": "demo-denied",
        "runner": "cli",
        "timeout_s": 60,
        "command": "rm",
        "args": ["-rf", "/"],
    },
]
FINAL = {"succeeded", "failed", "cancelled", "expired"}


def wait_file(path: Path, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            sys.exit(f"demo: {what} exited early (code {proc.returncode})")
        if time.monotonic() > deadline:
            sys.exit(f"demo: timed out waiting for {what}")
        time.sleep(0.05)


def wait_log_event(log: Path, event: str, proc: subprocess.Popen, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{") and f'"{event}"' in line:
                    record = json.loads(line)
                    if record.get("event") == event:
                        return record
        if proc.poll() is not None:
            sys.exit(f"demo: miner exited early (code {proc.returncode}); see {log}")
        if time.monotonic() > deadline:
            sys.exit(f"demo: timed out waiting for miner event {event}; see {log}")
        time.sleep(0.05)


def stop(proc: subprocess.Popen, name: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            print(f"demo: {name} did not stop in 15 s, killing it")
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--once", action="store_true", help="exit after the sample jobs")
    args = parser.parse_args()
    once = args.once or not sys.stdin.isatty()

    run_dir = REPO / ".demo" / time.strftime("run-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True)
    mock_log = run_dir / "mock.log"
    miner_log = run_dir / "miner.jsonl"
    ready = run_dir / "mock-ready.json"
    python = sys.executable

    with open(mock_log, "wb") as fh:
        mock = subprocess.Popen(
            [
                python,
                "-m",
                "mock_coordinator",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--ready-file",
                str(ready),
                "--data-dir",
                str(run_dir / "coordinator"),
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            process_group=0,
        )
    miner = None
    try:
        wait_file(ready, mock, "mock coordinator")
        info = json.loads(ready.read_text())
        env = dict(os.environ)
        env.update(
            {
                "MINER_AUTH": "dev-bootstrap-token",
                "AITBC_MINER_COORDINATOR__BASE_URL": info["url"],
                "AITBC_MINER_WORKSPACE__ROOT": str(run_dir / "miner" / "jobs"),
                "AITBC_MINER_CACHE__ROOT": str(run_dir / "miner" / "cache"),
                "AITBC_MINER_SECURITY__MANIFEST_KEYS": json.dumps(
                    {info["key_id"]: info["public_key"]}
                ),
                "AITBC_MINER_NODE_ID": "node-demo",
            }
        )
        with open(miner_log, "wb") as fh:
            miner = subprocess.Popen(
                [python, "-m", "aitbc_miner", "run", "--config", str(REPO / "etc/config.dev.yaml")],
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
                process_group=0,
            )
        started = wait_log_event(miner_log, "miner_started", miner)
        wait_log_event(miner_log, "registered", miner)
        health = started["health"][0] if started.get("health") else None
        admin = httpx.Client(base_url=info["admin_url"], timeout=10)
        for job in JOBS:
            admin.post("/jobs", json={"job": job, "retry": False}).raise_for_status()
        print(f"demo: enqueued {len(JOBS)} jobs at {info['url']}")

        deadline = time.monotonic() + 60
        while True:
            states = {j["job_id"]: admin.get(f"/jobs/{j['job_id']}").json() for j in JOBS}
            if all(s["state"] in FINAL for s in states.values()):
                break
            if time.monotonic() > deadline:
                print(
                    "demo: jobs did not finish in 60 s:", {k: v["state"] for k, v in states.items()}
                )
                return 1
            time.sleep(0.1)

        print("\n== jobs ==")
        ok = True
        for job_id, rec in states.items():
            fails = rec.get("fails") or []
            code = fails[-1]["error_code"] if fails else ""
            print(f"  {job_id:<14} {rec['state']:<10} {code}")
            expected_fail = job_id == "demo-denied"
            ok &= (rec["state"] == "failed") == expected_fail
        print("\n== artifacts (as received by the coordinator) ==")
        for job_id, rec in states.items():
            for art in (rec.get("result") or {}).get("artifacts", []):
                stored = (
                    run_dir
                    / "coordinator"
                    / "artifacts"
                    / job_id
                    / str(rec["attempt"])
                    / art["path"]
                )
                print(f"  {stored}  ({art['size']} bytes, sha256 {art['sha256'][:16]}...)")
        print(f"\n  miner workspace: {run_dir / 'miner' / 'jobs'}")
        print("\n== observe ==")
        if health:
            print(f"  health:   {health}/healthz")
            print(f"  ready:    {health}/readyz")
            print(f"  metrics:  {health}/metrics")
        print(f"  miner log (JSON lines): {miner_log}")
        print(f"  coordinator log:        {mock_log}")
        print(f"  coordinator admin API:  {info['admin_url']}/jobs")
        if not ok:
            print("demo: unexpected job outcome, see the logs above")
            return 1
        if once:
            return 0
        print("\nThe miner keeps serving; enqueue more jobs through the admin API. Ctrl-C to stop.")
        try:
            while miner.poll() is None and mock.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            print("\ndemo: stopping")
        return 0
    finally:
        if miner is not None:
            stop(miner, "miner")
        stop(mock, "mock coordinator")


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
