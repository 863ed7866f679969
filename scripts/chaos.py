#!/usr/bin/env python3
"""`make chaos`: prove that crashes and a faulty network lose and duplicate nothing.

Runs the real mock coordinator with fault injection (5xx, dropped connections
before and after processing, latency) and a queue of mixed jobs (quick, slow,
failing, large artifacts), SIGKILLs the real miner at random moments (and
SIGTERMs it a few times), restarting it each time on the same workspace. At
the end it checks the invariants, prints a table and a JSON summary line, and
exits non-zero unless:
  - every job is final at the coordinator, with the outcome its kind implies;
  - no job has two accepted results;
  - every accepted artifact's sha256 matches what the job wrote;
  - no process of any job, and no cgroup of its daemons, is left;
  - no workspace is left in a non-final or unconfirmed state.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
FINAL = {"succeeded", "failed", "cancelled", "expired"}
LARGE = 12 * 1024 * 1024  # above the 8 MiB chunk threshold: chunked, resumable upload

ALLOWLIST = """
name: sh
command:
  path: "/bin/sh"
args:
  - ["-c", ".{1,4000}"]
max_runtime_s: 120
max_output_mb: 64
"""


def make_jobs(n: int, rng: random.Random) -> dict[str, dict]:
    """job_id -> {"job": manifest, "kind": ..., "sha256": expected artifact sha256 or None}."""
    jobs = {}
    for i in range(n):
        job_id = f"chaos-{i:04d}"
        roll = rng.random()
        art = [{"path": "out.bin"}]
        if roll < 0.60:
            kind, script = "quick", 'printf "%s" "$AITBC_JOB_ID" > out.bin'
            sha = hashlib.sha256(job_id.encode()).hexdigest()
        elif roll < 0.75:
            delay = rng.choice(["0.3", "0.8", "1.5"])
            kind, script = "slow", f'sleep {delay}; printf "%s" "$AITBC_JOB_ID" > out.bin'
            sha = hashlib.sha256(job_id.encode()).hexdigest()
        elif roll < 0.90:
            kind, script, sha, art = "failing", "echo failing >&2; exit 3", None, []
        else:
            kind = "large"
            script = f"head -c {LARGE} /dev/zero | tr '\\0' 'z' > out.bin"
            sha = hashlib.sha256(b"z" * LARGE).hexdigest()
        manifest = {
            "job_id": job_id,
            "runner": "cli",
            "timeout_s": 60,
            "command": "sh",
            "args": ["-c", script],
            "artifacts": art,
        }
        jobs[job_id] = {"job": manifest, "kind": kind, "sha256": sha}
    return jobs


def leftover_cgroups(daemon_pids: list[int]) -> list[str]:
    """Job cgroups of these (now stopped) daemons that still exist: a clean stop
    removes its own, the next start removes those of a killed one (their names end
    in ".<daemon pid>-<token>", sandbox/cgroups.py)."""
    sys.path.insert(0, str(REPO))
    from aitbc_miner.sandbox.cgroups import detect

    support = detect("auto")
    bases = ([support.v2_base] if support.v2_base else []) + list(support.v1_bases.values())
    tags = tuple(f".{pid}-" for pid in daemon_pids)
    found = []
    for base in bases:
        for entry in os.scandir(base):
            if entry.is_dir() and any(t in entry.name for t in tags):
                found.append(str(Path(base) / entry.name))
    return found


class Miner:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log, self.proc = env, log, None
        self.pids: list[int] = []  # every daemon started (their cgroups carry the pid)

    def start(self) -> None:
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "aitbc_miner",
                    "run",
                    "--config",
                    str(REPO / "etc/config.dev.yaml"),
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        self.pids.append(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def job_processes(workspace: Path) -> list[psutil.Process]:
    """Live processes of *our* jobs: their AITBC_WORK_DIR is under our workspace
    (job ids alone could match a concurrent run's)."""
    prefix = str(workspace) + os.sep
    found = []
    for proc in psutil.process_iter():
        try:
            work_dir = proc.environ().get("AITBC_WORK_DIR") or ""
            if work_dir.startswith(prefix) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--jobs", type=int, default=300)
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--terms", type=int, default=3)
    p.add_argument("--error-rate", type=float, default=0.10)
    p.add_argument("--drop-rate", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=480.0, help="overall deadline, seconds")
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="aitbc-chaos-"))
    (tmp / "allowlist.d").mkdir()
    (tmp / "allowlist.d" / "sh.yaml").write_text(ALLOWLIST)
    ready = tmp / "mock.json"
    mock_log = open(tmp / "mock.log", "wb")
    mock = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mock_coordinator",
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--data-dir",
            str(tmp / "coordinator"),
            "--lease-s",
            "4",
            "--max-attempts",
            "30",
            "--seed",
            str(seed),
        ],
        stdout=mock_log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    miner = None
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            if mock.poll() is not None or time.monotonic() > deadline:
                print("chaos: mock coordinator did not start", file=sys.stderr)
                return 2
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        admin = httpx.Client(base_url=info["admin_url"], timeout=30)
        jobs = make_jobs(args.jobs, rng)
        admin.post(
            "/jobs", json={"jobs": [j["job"] for j in jobs.values()], "retry": True}
        ).raise_for_status()
        for spec in (
            {"endpoint": "*", "error_rate": args.error_rate, "status": 503},
            {"endpoint": "*", "drop_rate": args.drop_rate, "drop_after": False},
            {"endpoint": "*", "drop_rate": args.drop_rate, "drop_after": True},
            {"endpoint": "*", "latency_ms": [0, 40]},
        ):
            admin.post("/faults", json=spec).raise_for_status()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_")}
        env.update(
            {
                "MINER_AUTH": "dev-bootstrap-token",
                "AITBC_MINER_NODE_ID": "node-chaos",
                "AITBC_MINER_COORDINATOR__BASE_URL": info["url"],
                "AITBC_MINER_COORDINATOR__PULL_WAIT_S": "2",
                "AITBC_MINER_COORDINATOR__TIMEOUT_S": "10",
                "AITBC_MINER_SECURITY__MANIFEST_KEYS": json.dumps(
                    {info["key_id"]: info["public_key"]}
                ),
                "AITBC_MINER_WORKSPACE__ROOT": str(tmp / "miner" / "jobs"),
                "AITBC_MINER_CACHE__ROOT": str(tmp / "miner" / "cache"),
                "AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES": json.dumps(
                    [str(tmp / "allowlist.d" / "*.yaml")]
                ),
                "AITBC_MINER_RESOURCES__MAX_CONCURRENT_CPU": "4",
                "AITBC_MINER_HEARTBEAT__INTERVAL_S": "0.5",
                "AITBC_MINER_HEARTBEAT__BACKOFF__MIN_S": "0.05",
                "AITBC_MINER_HEARTBEAT__BACKOFF__MAX_S": "0.5",
                "AITBC_MINER_SHUTDOWN__GRACE_S": "2",
                "AITBC_MINER_SHUTDOWN__KILL_GRACE_S": "1",
                "AITBC_MINER_HEALTH__LISTEN": "",
            }
        )
        miner = Miner(env, tmp / "miner.jsonl")
        miner.start()
        kills = terms = 0
        plan = ["kill"] * args.kills + ["term"] * args.terms
        rng.shuffle(plan)

        def states() -> dict[str, dict]:
            return {j["id"]: j for j in admin.get("/jobs").json()}

        while True:
            summary = states()
            done = all(s["state"] in FINAL for s in summary.values())
            if done and not plan:
                break
            if time.monotonic() - started > args.timeout:
                print("chaos: deadline passed before every job was final", file=sys.stderr)
                break
            if plan and miner.alive():
                time.sleep(rng.uniform(0.5, 3.0))
                action = plan.pop()
                if action == "kill":
                    miner.proc.kill()
                    kills += 1
                else:
                    miner.proc.send_signal(signal.SIGTERM)
                    terms += 1
                try:
                    miner.proc.wait(30)
                except subprocess.TimeoutExpired:
                    miner.proc.kill()
                    miner.proc.wait()
                miner.start()
            else:
                time.sleep(0.25)
        # Stop it the way an operator does: SIGTERM, expecting a clean drain and exit 0
        # (even if it was restarted a moment ago and is still starting up).
        miner.proc.send_signal(signal.SIGTERM)
        last_exit = miner.proc.wait(60)

        # -- invariants -------------------------------------------------------------
        summary = states()
        lost, duplicated, wrong_sha, wrong_outcome = [], [], [], []
        for job_id, spec in jobs.items():
            rec = admin.get(f"/jobs/{job_id}").json()
            if rec["state"] not in ("succeeded", "failed"):
                lost.append(job_id)
                continue
            if rec["results_accepted"] > 1:
                duplicated.append(job_id)
            want = "failed" if spec["kind"] == "failing" else "succeeded"
            if rec["state"] != want:
                wrong_outcome.append(f"{job_id}:{rec['state']}")
            if rec["state"] == "succeeded":
                arts = rec["result"]["artifacts"]
                if not arts or arts[0]["sha256"] != spec["sha256"]:
                    wrong_sha.append(job_id)
                elif spec["kind"] != "large":
                    data = admin.get(f"/jobs/{job_id}/artifacts/out.bin").content
                    if hashlib.sha256(data).hexdigest() != spec["sha256"]:
                        wrong_sha.append(job_id)
        orphans = job_processes(tmp / "miner" / "jobs")
        left_groups = leftover_cgroups(miner.pids)
        unfinished_ws = []
        root = tmp / "miner" / "jobs"
        for state_file in root.glob("*/state.json"):
            st = json.loads(state_file.read_text())
            if (
                st["phase"] not in ("DONE", "FAILED", "RETRY_WAIT", "ABANDONED")
                or not st["confirmed"]
            ):
                unfinished_ws.append(f"{state_file.parent.name}:{st['phase']}")
        faults = admin.get("/faults").json()["faults"]
        fired = sum(f.get("fired", 0) for f in faults)
        elapsed = time.monotonic() - started
        result = {
            "seed": seed,
            "jobs": len(jobs),
            "kinds": {
                k: sum(1 for j in jobs.values() if j["kind"] == k)
                for k in ("quick", "slow", "failing", "large")
            },
            "succeeded": sum(1 for s in summary.values() if s["state"] == "succeeded"),
            "failed": sum(1 for s in summary.values() if s["state"] == "failed"),
            "kills": kills,
            "terms": terms,
            "faults_fired": fired,
            "lost": len(lost),
            "duplicated": len(duplicated),
            "wrong_sha256": len(wrong_sha),
            "wrong_outcome": len(wrong_outcome),
            "orphans": len(orphans),
            "leftover_cgroups": len(left_groups),
            "non_final_workspaces": len(unfinished_ws),
            "last_exit_code": last_exit,
            "seconds": round(elapsed, 1),
        }
        ok = (
            not (
                lost
                or duplicated
                or wrong_sha
                or wrong_outcome
                or orphans
                or left_groups
                or unfinished_ws
            )
            and last_exit == 0
        )
        print("\n== chaos ==")
        for key, value in result.items():
            print(f"  {key:<22} {value}")
        for name, items in (
            ("lost", lost),
            ("duplicated", duplicated),
            ("wrong sha256", wrong_sha),
            ("wrong outcome", wrong_outcome),
            ("orphans", [p.pid for p in orphans]),
            ("leftover cgroups", left_groups),
            ("non-final workspaces", unfinished_ws),
        ):
            if items:
                print(f"  !! {name}: {items[:20]}")
        kept = args.keep or os.environ.get("CHAOS_KEEP") is not None
        where = f"logs kept in {tmp}" if kept else "--keep to keep the logs"
        print(f"  verdict                {'PASS' if ok else 'FAIL'}  ({where})")
        print("CHAOS_RESULT " + json.dumps(result))
        for proc in orphans:
            proc.kill()
        return 0 if ok else 1
    finally:
        if miner is not None and miner.alive():
            miner.proc.kill()
        mock.send_signal(signal.SIGTERM)
        try:
            mock.wait(15)
        except subprocess.TimeoutExpired:
            mock.kill()
        mock_log.close()
        if not args.keep and os.environ.get("CHAOS_KEEP") is None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
