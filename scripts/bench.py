#!/usr/bin/env python3
"""`make bench`: what operators care about, measured on loopback, side by side with baselines.

Runs the real mock coordinator (`python -m mock_coordinator`) and the real
miner (`python -m aitbc_miner run --config etc/config.dev.yaml` with
AITBC_MINER_* overrides, as scripts/demo.py does) and measures:

  dispatch    job enqueued at the mock -> the job's first instruction (a timestamp the
              job writes itself), long-poll on, jobs enqueued one at a time to an idle
              miner; p50/p99 per run
  overhead    the full cycle at the mock (handed out -> result accepted) minus the
              command's own runtime (the span between the job's first and last timestamp)
  throughput  a backlog of trivial jobs with 4 CPU slots, jobs/s
  baseline    the same backlog through scripts/naive_miner.sh (bash + curl), jobs/s
  idle        RSS of the daemon and its fork server, CPU% over 60 s, heartbeat 15 s
  upload      a 1 GiB artifact: the miner's MiB/s vs curl on the same endpoints in the
              same run (chunked PUTs and single multipart), the miner's RSS growth
  recovery    SIGKILL with 4 jobs running, restart on the same workspace ->
              recovery_finished and -> all 4 reported at the mock
  sandbox     start cost of a trivial job through the fork server with every limit
              (cgroups, private netns, Landlock) vs a plain Popen (DirectSpawner)

Each figure is the median of several runs with [min-max]. Prints one table and
writes it, with the machine and every raw figure, to bench/results.json. No
assertions: targets that are missed are marked MISSED, the exit code stays 0.
See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BOOTSTRAP = "dev-bootstrap-token"
FINAL = {"succeeded", "failed", "cancelled", "expired"}
MIB = 1024 * 1024

# A test-only allowlist entry (as in tests/conftest.py): /bin/sh -c <script>.
ALLOWLIST = """
name: sh
command:
  path: "/bin/sh"
args:
  - ["-c", ".{1,4000}"]
max_runtime_s: 600
max_output_mb: 2048
"""
TRIVIAL = "date +%s.%N > t.txt"  # throughput: one timestamp, a 21-byte artifact
STAMPED = "date +%s.%N > t.txt; date +%s.%N >> t.txt"  # dispatch/overhead: first and last


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- statistics -------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def summary(values: Iterable[float]) -> dict[str, Any]:
    v = [x for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {
        "median": statistics.median(v),
        "min": min(v),
        "max": max(v),
        "runs": [round(x, 4) for x in v],
    }


def iso_ts(value: str) -> float:
    return dt.datetime.fromisoformat(value).timestamp()


# -- processes ---------------------------------------------------------------------------------


class LogTail:
    """Incremental reader of a JSON-lines log (the miner's stdout)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.rest = b""
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.pos)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        *lines, self.rest = (self.rest + data).split(b"\n")
        new = []
        for line in lines:
            if line.startswith(b"{"):
                try:
                    new.append(json.loads(line))
                except ValueError:
                    continue
        self.events.extend(new)
        return new

    def wait(
        self,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float = 30.0,
        proc: subprocess.Popen | None = None,
        interval: float = 0.002,
        since: int = 0,
    ) -> dict[str, Any]:
        """First event (from index `since`) matching `pred`."""
        deadline = time.monotonic() + timeout
        idx = since
        while True:
            self.poll()
            while idx < len(self.events):
                if pred(self.events[idx]):
                    return self.events[idx]
                idx += 1
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited ({proc.returncode}); see {self.path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching event within {timeout} s in {self.path}")
            time.sleep(interval)


def event(name: str, **match: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == name and all(e.get(k) == v for k, v in match.items())


class Mock:
    def __init__(self, tmp: Path, name: str, *extra: str) -> None:
        self.dir = tmp / name
        self.dir.mkdir(parents=True)
        ready = self.dir / "ready.json"
        self.stderr_path = self.dir / "stderr.log"
        with open(self.dir / "stdout.log", "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    PY,
                    "-m",
                    "mock_coordinator",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    "0",
                    "--ready-file",
                    str(ready),
                    "--data-dir",
                    str(self.dir / "data"),
                    "--lease-s",
                    "600",
                    *extra,
                ],
                stdout=out,
                stderr=err,
                cwd=REPO,
            )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mock coordinator did not start; see {self.dir}")
            time.sleep(0.02)
        self.info = json.loads(ready.read_text())
        self.url = self.info["url"]
        self.data = self.dir / "data"
        self.admin = httpx.Client(base_url=self.info["admin_url"], timeout=60)

    def enqueue(self, jobs: list[dict[str, Any]], **opts: Any) -> None:
        body = {"jobs": jobs, "retry": False, **opts}
        self.admin.post("/jobs", json=body).raise_for_status()

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.admin.get(f"/jobs/{job_id}")
        r.raise_for_status()
        return r.json()

    def artifact(self, job_id: str, path: str) -> bytes:
        r = self.admin.get(f"/jobs/{job_id}/artifacts/{path}")
        r.raise_for_status()
        return r.content

    def wait_final(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            by_state = self.admin.get("/stats").json().get("jobs_by_state", {})
            if sum(by_state.get(s, 0) for s in FINAL) >= n:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {by_state} after {timeout} s")
            time.sleep(0.1)

    def stop(self) -> None:
        self.admin.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Miner:
    def __init__(self, tmp: Path, mock: Mock, name: str, **overrides: str) -> None:
        self.tmp, self.name = tmp, name
        self.node_id = f"node-{name}"
        self.ws = tmp / name
        self.log_path = tmp / f"{name}.jsonl"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_MINER_")}
        self.env.update(
            {
                "MINER_AUTH": BOOTSTRAP,
                "AITBC_MINER_NODE_ID": self.node_id,
                "AITBC_MINER_COORDINATOR__BASE_URL": mock.url,
                "AITBC_MINER_SECURITY__MANIFEST_KEYS": json.dumps(
                    {mock.info["key_id"]: mock.info["public_key"]}
                ),
                "AITBC_MINER_WORKSPACE__ROOT": str(self.ws / "jobs"),
                "AITBC_MINER_CACHE__ROOT": str(self.ws / "cache"),
                "AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES": json.dumps(
                    [str(tmp / "allowlist.d" / "*.yaml")]
                ),
                "AITBC_MINER_HEARTBEAT__INTERVAL_S": "15",
                "AITBC_MINER_LOGGING__LEVEL": "info",
                "AITBC_MINER_LOGGING__PATH": "",
                "AITBC_MINER_HEALTH__LISTEN": "127.0.0.1:0",
                "AITBC_MINER_SHUTDOWN__GRACE_S": "5",
                "AITBC_MINER_SHUTDOWN__KILL_GRACE_S": "1",
            }
        )
        self.env.update(overrides)
        self.proc: subprocess.Popen | None = None
        self.tail = LogTail(self.log_path)
        self.started_wall = 0.0

    def start(self, wait: bool = True) -> None:
        self.started_wall = time.time()
        with open(self.log_path, "ab") as fh:
            self.proc = subprocess.Popen(
                [PY, "-m", "aitbc_miner", "run", "--config", str(REPO / "etc/config.dev.yaml")],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        if wait:
            self.wait(event("registered"), 60)

    def wait(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30, **kw: Any) -> dict:
        return self.tail.wait(pred, timeout, self.proc, **kw)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def forkserver(self) -> psutil.Process | None:
        try:
            for child in psutil.Process(self.pid).children():
                if any("forkserver.py" in part for part in child.cmdline()):
                    return child
        except psutil.Error:
            pass
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


class Profiler:
    """`py-spy record` of a process into collapsed stacks (--profile DIR; py-spy must be
    installed: .venv/bin/pip install py-spy). Off by default: sampling costs CPU."""

    def __init__(self, directory: str | None, pid: int, name: str, idle: bool = False) -> None:
        self.proc: subprocess.Popen | None = None
        spy = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))
        if directory is None or not Path(spy).exists():
            return
        out = Path(directory) / f"{name}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "250",
            "--format",
            "raw",
            "-o",
            str(out),
            "--threads",
        ] + (["--idle"] if idle else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class RssSampler(threading.Thread):
    """Peak RSS of a process, sampled every `interval` seconds until stopped."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


class LoopProbe(threading.Thread):
    """Latency of the miner's /healthz, polled every 100 ms: its event loop's stalls."""

    def __init__(self, url: str | None) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.worst = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        if not self.url:
            return
        with httpx.Client(timeout=30) as client:
            while not self._halt.is_set():
                t0 = time.perf_counter()
                try:
                    client.get(self.url + "/healthz")
                except httpx.HTTPError:
                    pass
                self.worst = max(self.worst, time.perf_counter() - t0)
                self._halt.wait(0.1)

    def stop(self) -> float:
        self._halt.set()
        self.join()
        return self.worst


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of a process and of its reaped children."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def sh_job(
    job_id: str,
    script: str,
    artifacts: tuple[dict[str, Any], ...] = ({"path": "t.txt"},),
    timeout_s: int = 120,
) -> dict[str, Any]:
    return {
        "job_id": job_id,
        "runner": "cli",
        "timeout_s": timeout_s,
        "command": "sh",
        "args": ["-c", script],
        "artifacts": list(artifacts),
    }


def stamps(raw: bytes) -> list[float]:
    return [float(x) for x in raw.decode().split()]


# -- sections -----------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.results: dict[str, Any] = {}
        self.details: dict[str, Any] = {}
        (tmp / "allowlist.d").mkdir()
        (tmp / "allowlist.d" / "sh.yaml").write_text(ALLOWLIST)
        self._n = 0
        self.pending_idle: tuple[Miner, Mock, dict[str, float]] | None = None

    def fresh(self, name: str) -> str:
        self._n += 1
        return f"{name}{self._n}"

    # dispatch latency, per-job overhead, then the idle footprint of the same daemon ------------
    def dispatch_and_idle(self) -> None:
        a = self.args
        mock = Mock(self.tmp, self.fresh("mock-dispatch"))
        miner = Miner(self.tmp, mock, self.fresh("disp"))
        try:
            miner.start()
            time.sleep(1.0)
            fresh = self._rss(miner)
            prof = Profiler(a.profile, miner.pid, "dispatch")
            p50s, p99s, overheads, breakdown = [], [], [], []
            for run in range(a.dispatch_runs):
                ids = []
                for i in range(a.dispatch_jobs):
                    job_id = f"d{run}-{i:04d}"
                    time.sleep(a.idle_gap)  # the miner is idle, its long poll waiting
                    mark = len(miner.tail.events)
                    mock.enqueue([sh_job(job_id, STAMPED)])
                    miner.wait(event("job_finished", job_id=job_id), 30, since=mark)
                    ids.append(job_id)
                lat, ovh = [], []
                for job_id in ids:
                    rec = mock.job(job_id)
                    if rec["state"] != "succeeded":
                        raise RuntimeError(f"{job_id} ended {rec['state']}: {rec.get('fails')}")
                    t1, t2 = stamps(mock.artifact(job_id, "t.txt"))
                    att = rec["attempts"][-1]
                    lat.append((t1 - rec["enqueued_at"]) * 1000)
                    ovh.append(((att["ended_at"] - att["handed_out_at"]) - (t2 - t1)) * 1000)
                    pt = json.loads((miner.ws / "jobs" / job_id / "state.json").read_bytes())
                    pt = pt.get("phase_times", {})
                    # The timeline of one job: mock timestamps, the miner's state.json
                    # phase_times (taken as each phase is persisted), the job's own stamps.
                    breakdown.append(
                        {
                            "enqueued -> handed out (mock)": att["handed_out_at"]
                            - rec["enqueued_at"],
                            "handed out -> acked (mock)": att["acked_at"] - att["handed_out_at"],
                            "acked -> PREP (verify, workspace, manifest, plan)": pt["PREP"]
                            - att["acked_at"],
                            "PREP -> RUNNING (inputs, cgroup)": pt["RUNNING"] - pt["PREP"],
                            "RUNNING -> job's first stamp (spawn)": t1 - pt["RUNNING"],
                            "job runtime (first -> last stamp)": t2 - t1,
                            "job's last stamp -> UPLOADING (exit, reap, cgroup, hash)": pt[
                                "UPLOADING"
                            ]
                            - t2,
                            "UPLOADING -> result accepted (POST)": att["ended_at"]
                            - pt["UPLOADING"],
                        }
                    )
                p50s.append(pct(lat, 50))
                p99s.append(pct(lat, 99))
                overheads.append(pct(ovh, 50))
                log(
                    f"dispatch run {run + 1}: p50 {p50s[-1]:.1f} ms, p99 {p99s[-1]:.1f} ms, "
                    f"overhead p50 {overheads[-1]:.1f} ms"
                )
            prof.stop()
            fin = [e for e in miner.tail.events if e.get("event") == "job_finished"]
            self.results["dispatch_p50_ms"] = summary(p50s)
            self.results["dispatch_p99_ms"] = summary(p99s)
            self.results["overhead_p50_ms"] = summary(overheads)
            self.details["dispatch"] = {
                "jobs_per_run": a.dispatch_jobs,
                "runs": a.dispatch_runs,
                "idle_gap_s": a.idle_gap,
                "script": STAMPED,
                "phases_ms_median": {
                    k: round(statistics.median(b[k] for b in breakdown) * 1000, 2)
                    for k in breakdown[0]
                },
                "miner_job_finished_ms_median": {
                    k: round(statistics.median(e[k] for e in fin if e.get(k) is not None) * 1000, 2)
                    for k in ("duration_s", "prep_s", "run_s", "report_s")
                },
            }
            if self.args.overlap_idle:
                # Measured later, while the naive baseline runs (see throughput()).
                self.pending_idle = (miner, mock, fresh)
                return
            self.idle(miner, fresh)
        finally:
            if self.pending_idle is None:
                miner.stop()
                mock.stop()

    def start_pending_idle(self) -> threading.Thread | None:
        """The idle window of the dispatch daemon, in the background. Its figures are the
        daemon's own CPU time and RSS, which a busy neighbour does not add to; running it
        beside the naive baseline (bash + curl against another mock) keeps make bench
        within 10 minutes."""
        if self.pending_idle is None:
            return None
        miner, _, fresh = self.pending_idle
        thread = threading.Thread(target=self.idle, args=(miner, fresh), daemon=True)
        thread.start()
        return thread

    def finish_pending_idle(self, thread: threading.Thread | None) -> None:
        if thread is not None:
            thread.join()
        if self.pending_idle is not None:
            miner, mock, _ = self.pending_idle
            self.pending_idle = None
            miner.stop()
            mock.stop()

    def _rss(self, miner: Miner) -> dict[str, float]:
        """RSS of the daemon, its fork server and the server's stems (prepared job
        starts; at idle its only children), and their PSS (shared pages counted once)."""
        daemon = psutil.Process(miner.pid)
        fs = miner.forkserver()
        stems = fs.children() if fs is not None else []
        out = {"daemon": 0.0, "forkserver": 0.0, "stems": 0.0, "pss": 0.0}
        for key, procs in (
            ("daemon", [daemon]),
            ("forkserver", [fs] if fs else []),
            ("stems", stems),
        ):
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                out[key] += info.rss / MIB
                out["pss"] += info.pss / MIB
        out["total"] = out["daemon"] + out["forkserver"] + out["stems"]
        return out

    def idle(self, miner: Miner, fresh: dict[str, float]) -> None:
        a = self.args
        log(f"idle footprint: {a.idle_s:g} s, heartbeat 15 s")
        time.sleep(2.0)
        daemon = psutil.Process(miner.pid)
        fs = miner.forkserver()
        procs = [p for p in (daemon, fs) if p is not None]
        procs += fs.children() if fs is not None else []  # the stems (spare job starts)

        def cpu() -> float:
            total = 0.0
            for p in procs:
                t = p.cpu_times()
                total += t.user + t.system
            return total

        windows = max(1, round(a.idle_s / 15)) if a.idle_s >= 15 else 1
        win_s = a.idle_s / windows
        cpu_pcts, samples = [], []
        cpu_start, wall_start = cpu(), time.monotonic()
        for _ in range(windows):
            c0, w0 = cpu(), time.monotonic()
            end = w0 + win_s
            while time.monotonic() < end:
                samples.append(self._rss(miner))
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            cpu_pcts.append((cpu() - c0) / (time.monotonic() - w0) * 100)
        self.results["idle_rss_daemon_mib"] = summary(s["daemon"] for s in samples)
        self.results["idle_rss_forkserver_mib"] = summary(s["forkserver"] for s in samples)
        self.results["idle_rss_stems_mib"] = summary(s["stems"] for s in samples)
        self.results["idle_rss_total_mib"] = summary(s["total"] for s in samples)
        self.results["idle_pss_total_mib"] = summary(s["pss"] for s in samples)
        # The kernel counts CPU time in 10 ms ticks: the whole window is the figure,
        # its 15 s windows (one heartbeat each) give the spread.
        overall = (cpu() - cpu_start) / (time.monotonic() - wall_start) * 100
        self.results["idle_cpu_pct"] = {**summary(cpu_pcts), "median": overall}
        for name in ("daemon", "forkserver", "stems"):
            k = self.results[f"idle_rss_{name}_mib"]
            k["runs"] = [*k["runs"][:5], "..."] if len(k["runs"]) > 5 else k["runs"]
        self.results["idle_rss_total_mib"]["runs"] = []
        self.results["idle_pss_total_mib"]["runs"] = []
        self.details["idle"] = {
            "window_s": a.idle_s,
            "cpu_windows": len(cpu_pcts),
            "rss_samples": len(samples),
            "rss_fresh_mib": {k: round(v, 1) for k, v in fresh.items()},
            "jobs_run_before": a.dispatch_jobs * a.dispatch_runs,
        }

    # throughput vs the naive baseline, interleaved run by run -------------------------------------
    def throughput(self) -> None:
        a = self.args
        ours, naive = [], []
        extra: dict[str, Any] = {"ours": [], "naive": []}
        idle: threading.Thread | None = None
        try:
            for run in range(a.tp_runs):
                rate, info = self._ours_tp(run)
                ours.append(rate)
                extra["ours"].append(info)
                log(f"throughput run {run + 1}: {rate:.1f} jobs/s ({info})")
                if self.naive_ok():
                    if run == 0:
                        idle = self.start_pending_idle()
                    rate, info = self._naive_tp(run)
                    naive.append(rate)
                    extra["naive"].append(info)
                    log(f"naive run {run + 1}: {rate:.1f} jobs/s ({info})")
                    self.finish_pending_idle(idle)
                    idle = None
        finally:
            self.finish_pending_idle(idle)
        self.results["throughput_jobs_s"] = summary(ours)
        if naive:
            self.results["naive_jobs_s"] = summary(naive)
            self.results["ratio_ours_naive"] = summary(
                o / n for o, n in zip(ours, naive, strict=True)
            )
        self.details["throughput"] = {
            "jobs": a.tp_jobs,
            "runs": a.tp_runs,
            "cpu_slots": 4,
            "script": TRIVIAL,
            **extra,
        }

    def naive_ok(self) -> bool:
        missing = [t for t in ("curl", "jq", "sha256sum") if shutil.which(t) is None]
        if missing:
            self.details["naive_skipped"] = f"missing tools: {missing}"
        return not missing

    def _rate(self, mock: Mock, ids: list[str]) -> tuple[float, dict[str, Any]]:
        recs = [mock.job(j) for j in ids]
        bad = [r["id"] for r in recs if r["state"] != "succeeded"]
        first = min(r["attempts"][0]["handed_out_at"] for r in recs if r["attempts"])
        last = max(r["finished_at"] or 0 for r in recs)
        span = last - first
        return len(ids) / span, {"span_s": round(span, 3), "not_succeeded": len(bad)}

    def _ours_tp(self, run: int) -> tuple[float, dict[str, Any]]:
        a = self.args
        mock = Mock(self.tmp, self.fresh("mock-tp"))
        miner = Miner(
            self.tmp, mock, self.fresh("tp"), AITBC_MINER_RESOURCES__MAX_CONCURRENT_CPU="4"
        )
        try:
            miner.start()
            time.sleep(0.5)
            prof = Profiler(a.profile if run == 0 else None, miner.pid, "throughput")
            fs = miner.forkserver()
            procs = {"mock": psutil.Process(mock.proc.pid), "daemon": psutil.Process(miner.pid)}
            if fs is not None:
                procs["forkserver+jobs"] = fs
            before = {k: cpu_s(p) for k, p in procs.items()}
            ids = [f"t{run}-{i:05d}" for i in range(a.tp_jobs)]
            mock.enqueue([sh_job(j, TRIVIAL) for j in ids])
            mock.wait_final(len(ids), timeout=max(120, a.tp_jobs / 5))
            prof.stop()
            rate, info = self._rate(mock, ids)
            info["cpu_ms_per_job"] = {
                k: round((cpu_s(p) - before[k]) * 1000 / len(ids), 2) for k, p in procs.items()
            }
            info["rss_after_mib"] = round(self._rss(miner)["total"], 1)
            return rate, info
        finally:
            miner.stop()
            mock.stop()

    def _naive_tp(self, run: int) -> tuple[float, dict[str, Any]]:
        a = self.args
        mock = Mock(self.tmp, self.fresh("mock-naive"))
        node = f"naive-{run}"
        work = self.tmp / f"naive-{run}"
        env = dict(os.environ, MINER_AUTH=BOOTSTRAP, NAIVE_NODE_ID=node, NAIVE_WORKDIR=str(work))
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        children_before = used.ru_utime + used.ru_stime
        with open(self.tmp / f"naive-{run}.log", "wb") as fh:
            proc = subprocess.Popen(
                ["bash", str(REPO / "scripts" / "naive_miner.sh"), mock.url, str(a.tp_jobs)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            deadline = time.monotonic() + 30
            while not any(n["node_id"] == node for n in mock.admin.get("/nodes").json()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("naive miner did not register")
                time.sleep(0.05)
            time.sleep(0.5)
            mock_before = cpu_s(psutil.Process(mock.proc.pid))
            ids = [f"n{run}-{i:05d}" for i in range(a.tp_jobs)]
            mock.enqueue([sh_job(j, TRIVIAL) for j in ids])
            mock.wait_final(len(ids), timeout=max(180, a.tp_jobs / 2))
            rate, info = self._rate(mock, ids)
            mock_ms = (cpu_s(psutil.Process(mock.proc.pid)) - mock_before) * 1000 / len(ids)
            proc.wait(30)  # it exits after its MAX_JOBS; its CPU (bash, curl, jq, jobs) is ours
            used = resource.getrusage(resource.RUSAGE_CHILDREN)
            naive_s = used.ru_utime + used.ru_stime - children_before
            info["cpu_ms_per_job"] = {
                "mock": round(mock_ms, 2),
                "naive (bash+curl+jq+jobs)": round(naive_s * 1000 / len(ids), 2),
            }
            return rate, info
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait()
            mock.stop()
            shutil.rmtree(work, ignore_errors=True)

    # upload: miner vs curl, chunked and multipart -------------------------------------------------
    def upload(self) -> None:
        a = self.args
        size = a.upload_mib * MIB
        big = self.tmp / "upload" / "big.bin"
        big.parent.mkdir()
        subprocess.run(["head", "-c", str(size), "/dev/zero"], stdout=open(big, "wb"), check=True)
        chunks = self.tmp / "upload" / "chunks"
        chunks.mkdir()
        mock = Mock(self.tmp, self.fresh("mock-upload"), "--log-requests")
        chunk_size = 4 * MIB  # the mock's default `chunk_size` offered to miners
        subprocess.run(
            ["split", "-b", str(chunk_size), "-d", "-a", "5", str(big), str(chunks / "c.")],
            check=True,
        )
        out: dict[str, Any] = {}
        try:
            curl = CurlNode(mock, self.tmp / "upload")
            for mode, threshold in (("chunked", "8"), ("multipart", str(2 * a.upload_mib + 1))):
                miner = Miner(
                    self.tmp,
                    mock,
                    self.fresh(f"up-{mode}-"),
                    AITBC_MINER_UPLOAD__CHUNK_THRESHOLD_MB=threshold,
                )
                miner.start()
                time.sleep(0.5)
                m_rates, c_rates, ratios, growth, e2e = [], [], [], [], []
                try:
                    for run in range(a.upload_runs):
                        prof = Profiler(
                            a.profile if run == 0 else None, miner.pid, f"upload-{mode}"
                        )
                        rate, grow, report_s = self._miner_upload(mock, miner, mode, run, size)
                        prof.stop()
                        crate = curl.upload(mode, big, chunks, size, run)
                        cpu = self.details["upload_cpu_s"][mode]
                        cpu.setdefault("curl", []).append(round(curl.cpu[0], 2))
                        cpu.setdefault("mock, curl uploading", []).append(round(curl.cpu[1], 2))
                        m_rates.append(rate)
                        c_rates.append(crate)
                        ratios.append(rate / crate)
                        growth.append(grow)
                        e2e.append(size / MIB / report_s)
                        log(
                            f"upload {mode} run {run + 1}: miner {rate:.0f} MiB/s, curl "
                            f"{crate:.0f} MiB/s, RSS +{grow:.1f} MiB"
                        )
                finally:
                    miner.stop()
                self.results[f"upload_{mode}_miner_mib_s"] = summary(m_rates)
                self.results[f"upload_{mode}_curl_mib_s"] = summary(c_rates)
                self.results[f"upload_{mode}_ratio"] = summary(ratios)
                self.results[f"upload_{mode}_rss_growth_mib"] = summary(growth)
                out[mode] = {"miner_collect_hash_upload_mib_s": summary(e2e)}
        finally:
            mock.stop()
            shutil.rmtree(self.tmp / "upload", ignore_errors=True)
        self.details["upload"] = {
            "size_mib": a.upload_mib,
            "chunk_size_mib": chunk_size // MIB,
            "runs": a.upload_runs,
            "timed": "at the mock (--log-requests): start of the first upload request of the "
            "job to the end of its jobs/result request; identical for miner and curl",
            **out,
        }

    def _miner_upload(
        self, mock: Mock, miner: Miner, mode: str, run: int, size: int
    ) -> tuple[float, float, float]:
        job_id = f"up-{mode}-{run}"
        base = psutil.Process(miner.pid).memory_info().rss
        sampler = RssSampler(miner.pid)
        sampler.start()
        started = next(e for e in miner.tail.events if e.get("event") == "miner_started")
        probe = LoopProbe((started.get("health") or [None])[0])
        probe.start()
        mark = len(miner.tail.events)
        log_mark = mock.stderr_path.stat().st_size
        daemon, mock_proc = psutil.Process(miner.pid), psutil.Process(mock.proc.pid)
        cpu0 = cpu_s(daemon), cpu_s(mock_proc)
        script = f"head -c {size} /dev/zero > big.bin"
        mock.enqueue([sh_job(job_id, script, ({"path": "big.bin", "max_mb": 2048},), 600)])
        fin = miner.wait(event("job_finished", job_id=job_id), 600, since=mark)
        peak = sampler.stop()
        cpu = self.details.setdefault("upload_cpu_s", {}).setdefault(mode, {})
        cpu.setdefault("miner (hash + upload)", []).append(round(cpu_s(daemon) - cpu0[0], 2))
        cpu.setdefault("mock, miner uploading", []).append(round(cpu_s(mock_proc) - cpu0[1], 2))
        self.details.setdefault("upload_loop_stall_s", {}).setdefault(mode, []).append(
            round(probe.stop(), 3)
        )
        if fin.get("outcome") != "done":
            raise RuntimeError(f"upload job {job_id}: {fin}")
        seconds = request_span(mock, miner.node_id, log_mark)
        # free the disk: the mock's copy and part file, the miner's workspace
        for d in (mock.data / "artifacts" / job_id, Path(fin["workspace"])):
            shutil.rmtree(d, ignore_errors=True)
        for part in (mock.data / "uploads").glob("*.part"):
            part.unlink()
        return size / MIB / seconds, (peak - base) / MIB, fin["report_s"]

    # recovery ---------------------------------------------------------------------------------
    def recovery(self) -> None:
        a = self.args
        mock = Mock(self.tmp, self.fresh("mock-recovery"))
        to_event, to_reported, scan_to_finish, to_started = [], [], [], []
        try:
            for run in range(a.recovery_runs):
                miner = Miner(
                    self.tmp, mock, self.fresh("rec"), AITBC_MINER_RESOURCES__MAX_CONCURRENT_CPU="4"
                )
                miner.start()
                ids = [f"r{run}-{i}" for i in range(4)]
                mock.enqueue([sh_job(j, "sleep 300", ()) for j in ids])
                root = miner.ws / "jobs"
                deadline = time.monotonic() + 30
                while not all(_phase(root / j) == "RUNNING" for j in ids):
                    if time.monotonic() > deadline:
                        raise TimeoutError("recovery jobs did not all start")
                    time.sleep(0.02)
                time.sleep(0.2)
                miner.kill()
                mark = len(miner.tail.events)
                miner.start(wait=False)
                t0 = miner.started_wall
                try:
                    fin = miner.wait(event("recovery_finished"), 60, since=mark)
                    started = miner.wait(event("miner_started"), 1, since=mark)
                    deadline = time.monotonic() + 30
                    while True:
                        recs = [mock.job(j) for j in ids]
                        if all(r["state"] in FINAL for r in recs):
                            break
                        if time.monotonic() > deadline:
                            raise TimeoutError("recovered jobs not reported")
                        time.sleep(0.02)
                    codes = {f["error_code"] for r in recs for f in r["fails"]}
                    to_event.append(iso_ts(fin["ts"]) - t0)
                    to_started.append(iso_ts(started["ts"]) - t0)
                    scan_to_finish.append(fin["elapsed_s"])
                    to_reported.append(max(r["fails"][-1]["ts"] for r in recs) - t0)
                    log(
                        f"recovery run {run + 1}: recovery_finished {to_event[-1]:.2f} s, "
                        f"all reported {to_reported[-1]:.2f} s ({sorted(codes)})"
                    )
                finally:
                    miner.stop()
        finally:
            mock.stop()
        self.results["recovery_s"] = summary(to_event)
        self.results["recovery_reported_s"] = summary(to_reported)
        self.details["recovery"] = {
            "runs": a.recovery_runs,
            "restart_to_miner_started_s": summary(to_started),
            "scan_to_recovery_finished_s": summary(scan_to_finish),
        }

    # sandbox ----------------------------------------------------------------------------------
    def sandbox(self) -> None:
        import trio

        a = self.args
        res = trio.run(sandbox_bench, self.tmp / "sandbox", a.sandbox_n, a.sandbox_rounds)
        for k, v in res.items():
            if k.startswith("_"):
                self.details.setdefault("sandbox", {})[k[1:]] = v
            else:
                self.results[k] = summary(v)


def _phase(job_dir: Path) -> str | None:
    try:
        return json.loads((job_dir / "state.json").read_text()).get("phase")
    except (OSError, ValueError):
        return None


def request_span(mock: Mock, node_id: str, offset: int) -> float:
    """Seconds from the start of the first upload request of `node_id` (logged after
    `offset`) to the end of its jobs/result, from the mock's --log-requests lines."""
    deadline = time.monotonic() + 10
    while True:
        with open(mock.stderr_path, "rb") as fh:
            fh.seek(offset)
            lines = [json.loads(x) for x in fh.read().splitlines() if x.startswith(b"{")]
        mine = [x for x in lines if x.get("node_id") == node_id]
        ends = [x for x in mine if x["endpoint"] == "jobs/result" and x["status"] == 200]
        if ends:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("no jobs/result in the mock's request log")
        time.sleep(0.05)
    uploads = [x for x in mine if x["endpoint"] in ("jobs/uploads", "uploads/put")]
    first = uploads[0] if uploads else ends[0]
    return ends[0]["ts"] - (first["ts"] - first["ms"] / 1000)


class CurlNode:
    """A second node of the same mock that holds jobs and uploads them with curl."""

    def __init__(self, mock: Mock, tmp: Path) -> None:
        self.mock, self.tmp = mock, tmp
        self.node_id = "node-curl"
        reply = self._post("nodes/register", {"node_id": self.node_id}, BOOTSTRAP)
        self.token = reply["node_token"]
        self.cpu = (0.0, 0.0)  # CPU seconds of the last upload: curl, the mock

    def _post(self, path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        r = httpx.post(
            f"{self.mock.url}/{path}",
            json=body,
            headers={
                "Authorization": f"Bearer {token or self.token}",
                "Idempotency-Key": str(uuid.uuid4()),
            },
            timeout=60,
        )
        r.raise_for_status()
        return r.json()

    def _curl(self, *args: str) -> str:
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--fail-with-body",
                "-H",
                "Expect:",
                "-H",
                f"Authorization: Bearer {self.token}",
                *args,
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout

    def upload(self, mode: str, big: Path, chunks: Path, size: int, run: int) -> float:
        """Hold a job (its runner matches no miner), upload `big` as `mode`; MiB/s."""
        job_id = f"curl-{mode}-{run}"
        self.mock.enqueue(
            [{"job_id": job_id, "runner": "bench-curl", "timeout_s": 60}], sign="none"
        )
        pulled = self._post("jobs/pull", {"node_id": self.node_id, "filters": {}, "wait_s": 5})
        assert pulled["job"]["job_id"] == job_id, pulled
        attempt = pulled["job"]["attempt"]
        self._post(
            "jobs/ack",
            {
                "job_id": job_id,
                "node_id": self.node_id,
                "lease_id": pulled["lease"]["lease_id"],
                "attempt": attempt,
            },
        )
        sha = _sha256_zeros(size)
        meta = {
            "job_id": job_id,
            "node_id": self.node_id,
            "attempt": attempt,
            "exit_code": 0,
            "artifacts": [
                {
                    "path": "big.bin",
                    "type": "application/octet-stream",
                    "size": size,
                    "sha256": sha,
                    "upload_id": None,
                }
            ],
        }
        log_mark = self.mock.stderr_path.stat().st_size
        mock_proc = psutil.Process(self.mock.proc.pid)
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0 = used.ru_utime + used.ru_stime, cpu_s(mock_proc)
        if mode == "chunked":
            start = self._curl(
                "-X",
                "POST",
                f"{self.mock.url}/jobs/{job_id}/uploads",
                "-H",
                "Content-Type: application/json",
                "-H",
                f"Idempotency-Key: {uuid.uuid4()}",
                "-d",
                json.dumps(
                    {
                        "node_id": self.node_id,
                        "attempt": attempt,
                        "path": "big.bin",
                        "size": size,
                        "sha256": sha,
                    }
                ),
            )
            upload_id, chunk = json.loads(start)["upload_id"], json.loads(start)["chunk_size"]
            cfg = self.tmp / "curl-puts.cfg"
            lines = []
            for i, offset in enumerate(range(0, size, chunk)):
                last = min(offset + chunk, size) - 1
                if i:
                    lines.append("next")
                lines += [
                    f'url = "{self.mock.url}/uploads/{upload_id}"',
                    'request = "PUT"',
                    f'upload-file = "{chunks / f"c.{i:05d}"}"',
                    f'header = "Content-Range: bytes {offset}-{last}/{size}"',
                    f'header = "Idempotency-Key: {uuid.uuid4()}"',
                    'header = "Content-Type: application/octet-stream"',
                    f'header = "Authorization: Bearer {self.token}"',
                    'header = "Expect:"',
                    'output = "/dev/null"',
                    "fail",
                    "silent",
                ]
            cfg.write_text("\n".join(lines) + "\n")
            subprocess.run(["curl", "-K", str(cfg)], check=True)
            meta["artifacts"][0]["upload_id"] = upload_id
            self._curl(
                "-X",
                "POST",
                f"{self.mock.url}/jobs/result",
                "-H",
                f"Idempotency-Key: {uuid.uuid4()}",
                "-F",
                f"metadata={json.dumps(meta)};type=application/json",
            )
        else:
            self._curl(
                "-X",
                "POST",
                f"{self.mock.url}/jobs/result",
                "-H",
                f"Idempotency-Key: {uuid.uuid4()}",
                "-F",
                f"metadata={json.dumps(meta)};type=application/json",
                "-F",
                f"artifact=@{big};filename=big.bin;type=application/octet-stream",
            )
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.cpu = (used.ru_utime + used.ru_stime - cpu0[0], cpu_s(mock_proc) - cpu0[1])
        seconds = request_span(self.mock, self.node_id, log_mark)
        rec = self.mock.job(job_id)
        if rec["state"] != "succeeded":
            raise RuntimeError(f"curl upload {job_id} ended {rec['state']}")
        shutil.rmtree(self.mock.data / "artifacts" / job_id, ignore_errors=True)
        for part in (self.mock.data / "uploads").glob("*.part"):
            part.unlink()
        return size / MIB / seconds


_ZERO_SHA: dict[int, str] = {}


def _sha256_zeros(size: int) -> str:
    if size not in _ZERO_SHA:
        import hashlib

        h = hashlib.sha256()
        block = bytes(MIB)
        for _ in range(size // MIB):
            h.update(block)
        h.update(bytes(size % MIB))
        _ZERO_SHA[size] = h.hexdigest()
    return _ZERO_SHA[size]


SPACING_S = 0.1  # between spaced job starts
FEATURES: dict[str, set[str]] = {
    "direct": set(),
    "forkserver": set(),
    "fs+rlimits": {"rlimits"},
    "fs+rlimits+netns": {"rlimits", "netns"},
    "fs+landlock": {"landlock"},
    "fs+rlimits+cgroup": {"rlimits", "cgroup"},
    "full-cold": {"rlimits", "netns", "landlock", "cgroup"},
    # What aitbc_miner/jobs does: take a warm start (cgroups joined, netns entered ahead of time).
    "full": {"rlimits", "netns", "landlock", "cgroup", "warm"},
}
HEADLINE = ("direct", "forkserver", "full", "full-cold")


async def sandbox_bench(tmp: Path, n: int, rounds: int) -> dict[str, Any]:
    """run_process(/bin/true) through DirectSpawner vs the fork server (with and without limits)."""
    import logging

    import structlog
    import trio

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sys.path.insert(0, str(REPO))
    from aitbc_miner.runners.base import Spawn, run_process
    from aitbc_miner.sandbox.cgroups import JobCgroup, detect, limit_files
    from aitbc_miner.sandbox.limits import LimitPolicy, landlock_rules, process_limits
    from aitbc_miner.sandbox.spawner import DirectSpawner, ForkServer
    from aitbc_miner.sandbox.warm import WarmPool

    job = tmp / "job"
    for sub in ("input", "work", "output", "logs"):
        (job / sub).mkdir(parents=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(job / "work"), "LANG": "C.UTF-8"}
    support = detect("auto")
    server = ForkServer()
    await server.open()
    netns = server.netns == "ok"
    landlock = server.landlock_abi > 0
    direct = DirectSpawner()
    pool = WarmPool(support, server, netns=netns) if support.active else None
    warm_used = {"warm": 0, "cold": 0}

    def spawn(limits: dict[str, Any]) -> Spawn:
        return Spawn(
            argv=["/bin/true"],
            cwd=job / "work",
            env=env,
            log_path=job / "logs" / "exec.log",
            timeout_s=10,
            kill_grace_s=1,
            limits=limits,
        )

    async def one(kind: str) -> tuple[float, float]:
        """(start, cycle) of run_process(/bin/true), with the cgroup work aitbc_miner/jobs does.

        start: until the job's program is exec'd (both spawners return only then),
        its cgroup made or taken first. cycle: until it is reaped and its group removed.
        """
        feats = FEATURES[kind]
        started: list[float] = []

        async def on_started(_pgid: int) -> None:
            started.append(time.perf_counter())

        t0 = time.perf_counter()
        if kind == "direct":
            r = await run_process(
                spawn({}), cancel=trio.Event(), spawner=direct, on_started=on_started
            )
        else:
            cg = warm = None
            files = limit_files(2048, None, 512)
            if "warm" in feats and pool is not None:
                warm = await pool.take(files, netns=netns and "netns" in feats)
                warm_used["warm" if warm else "cold"] += 1
                cg = warm.cgroup if warm else None
            if cg is None and "cgroup" in feats and support.active:
                cg = await trio.to_thread.run_sync(JobCgroup.create, support, "bench", 1, files)
            limits: dict[str, Any] = {}
            if "rlimits" in feats:
                limits = process_limits(
                    LimitPolicy(),
                    mem_mb=2048,
                    max_output_mb=64,
                    memory_cgroup=cg is not None and cg.limits_memory,
                    network=not (netns and "netns" in feats),
                    cgroup_procs=cg.procs_files if cg else [],
                )
            if landlock and "landlock" in feats:
                limits["landlock"] = landlock_rules(str(job), ["/bin"])
            if warm is not None:
                limits["stem"] = warm.ref
            r = await run_process(
                spawn(limits), cancel=trio.Event(), spawner=server, cgroup=cg, on_started=on_started
            )
            if warm is not None and pool is not None:
                await pool.forget(warm)
            if cg is not None:
                await trio.to_thread.run_sync(cg.remove)
        if r.exit_code != 0:
            raise RuntimeError(f"{kind}: /bin/true ended {r}")
        return (started[0] - t0) * 1000, (time.perf_counter() - t0) * 1000

    out: dict[str, list[float]] = {kind: [] for kind in FEATURES}
    cycle: dict[str, list[float]] = {kind: [] for kind in FEATURES}
    try:
        async with trio.open_nursery() as nursery:
            if pool is not None:
                await nursery.start(pool.run)
            spaced = await sandbox_rounds(one, out, cycle, n, rounds)
            nursery.cancel_scope.cancel()
    finally:
        await server.aclose()
    direct_ms = statistics.median(out["direct"])
    parts = {
        kind: round(statistics.median(v) - direct_ms, 2)
        for kind, v in out.items()
        if kind not in HEADLINE
    }
    return {
        "sandbox_direct_ms": out["direct"],
        "sandbox_forkserver_ms": out["forkserver"],
        "sandbox_full_ms": out["full"],
        "sandbox_cold_ms": out["full-cold"],
        "sandbox_added_ms": [f - d for f, d in zip(out["full"], out["direct"], strict=True)],
        "sandbox_spaced_direct_ms": spaced["direct"],
        "sandbox_spaced_full_ms": spaced["full"],
        "sandbox_spaced_cold_ms": spaced["full-cold"],
        "sandbox_spaced_added_ms": [
            f - d for f, d in zip(spaced["full"], spaced["direct"], strict=True)
        ],
        "sandbox_spaced_cold_added_ms": [
            f - d for f, d in zip(spaced["full-cold"], spaced["direct"], strict=True)
        ],
        "sandbox_cycle_direct_ms": cycle["direct"],
        "sandbox_cycle_full_ms": cycle["full"],
        "sandbox_cycle_added_ms": [
            f - d for f, d in zip(cycle["full"], cycle["direct"], strict=True)
        ],
        "_spacing_s": SPACING_S,
        "_added_ms_by_feature_vs_direct": parts,
        "_warm_starts": warm_used,
        "_runs_per_round": n,
        "_rounds": rounds,
        "_full_limits": {
            "cgroup": support.enforced() if support.active else "unavailable",
            "netns": netns,
            "landlock_abi": server.landlock_abi,
            "rlimits+nice+ionice+no_new_privs": True,
        },
    }


async def sandbox_rounds(
    one: Any, out: dict[str, list[float]], cycle: dict[str, list[float]], n: int, rounds: int
) -> dict[str, list[float]]:
    """Back-to-back medians into `out` (start) and `cycle`; returns the start medians
    of runs SPACING_S apart."""
    import trio

    for kind in out:  # warm-up
        for _ in range(5):
            await one(kind)
    spaced: dict[str, list[float]] = {"direct": [], "full": [], "full-cold": []}
    for _ in range(rounds):
        for kind in out:
            n_kind = n if kind in HEADLINE else max(20, n // 4)
            runs = [await one(kind) for _ in range(n_kind)]
            out[kind].append(statistics.median(r[0] for r in runs))
            cycle[kind].append(statistics.median(r[1] for r in runs))
        # Jobs of a real miner start tens of ms apart, not back to back: a cgroup
        # migration then pays for an RCU grace period (cgroup_threadgroup_rwsem).
        for kind in spaced:
            times = []
            for _ in range(max(10, n // 8)):
                await trio.sleep(SPACING_S)
                times.append((await one(kind))[0])
            spaced[kind].append(statistics.median(times))
    return spaced


# -- report -----------------------------------------------------------------------------------

ROWS = [
    # key, label, unit, target text, check(median) -> bool | None
    ("dispatch_p50_ms", "dispatch latency p50", "ms", "<= 20", lambda v: v <= 20),
    ("dispatch_p99_ms", "dispatch latency p99", "ms", "<= 100", lambda v: v <= 100),
    ("overhead_p50_ms", "per-job overhead p50", "ms", "<= 15", lambda v: v <= 15),
    ("throughput_jobs_s", "throughput (4 CPU slots)", "jobs/s", ">= 60", lambda v: v >= 60),
    ("naive_jobs_s", "baseline: naive_miner.sh", "jobs/s", "-", None),
    ("ratio_ours_naive", "ratio ours / naive", "x", "report", None),
    ("idle_rss_daemon_mib", "idle RSS daemon", "MiB", "-", None),
    ("idle_rss_forkserver_mib", "idle RSS fork server", "MiB", "-", None),
    ("idle_rss_stems_mib", "idle RSS spare starts (stems)", "MiB", "-", None),
    ("idle_rss_total_mib", "idle RSS total", "MiB", "<= 45", lambda v: v <= 45),
    ("idle_pss_total_mib", "idle PSS total (shared pages once)", "MiB", "-", None),
    ("idle_cpu_pct", "idle CPU, whole window [15 s windows]", "%", "<= 0.2", lambda v: v <= 0.2),
    ("upload_chunked_miner_mib_s", "upload {size} chunked: miner", "MiB/s", "-", None),
    ("upload_chunked_curl_mib_s", "upload {size} chunked: curl", "MiB/s", "-", None),
    ("upload_chunked_ratio", "upload chunked miner / curl", "x", ">= 0.9", lambda v: v >= 0.9),
    (
        "upload_chunked_rss_growth_mib",
        "upload chunked RSS growth",
        "MiB",
        "<= 32",
        lambda v: v <= 32,
    ),
    ("upload_multipart_miner_mib_s", "upload {size} multipart: miner", "MiB/s", "-", None),
    ("upload_multipart_curl_mib_s", "upload {size} multipart: curl", "MiB/s", "-", None),
    ("upload_multipart_ratio", "upload multipart miner / curl", "x", ">= 0.9", lambda v: v >= 0.9),
    (
        "upload_multipart_rss_growth_mib",
        "upload multipart RSS growth",
        "MiB",
        "<= 32",
        lambda v: v <= 32,
    ),
    ("recovery_s", "recovery: restart -> recovery_finished", "s", "<= 2", lambda v: v <= 2),
    ("recovery_reported_s", "recovery: restart -> all 4 reported", "s", "<= 2", lambda v: v <= 2),
    ("sandbox_direct_ms", "job start: plain Popen (DirectSpawner)", "ms", "-", None),
    ("sandbox_forkserver_ms", "job start: fork server, no limits", "ms", "-", None),
    ("sandbox_cold_ms", "job start: full limits, cold fork", "ms", "-", None),
    ("sandbox_full_ms", "job start: full limits, warm start", "ms", "-", None),
    ("sandbox_added_ms", "sandbox start overhead (warm - plain)", "ms", "<= 5", lambda v: v <= 5),
    ("sandbox_spaced_direct_ms", "job start 100 ms apart: plain Popen", "ms", "-", None),
    ("sandbox_spaced_cold_ms", "job start 100 ms apart: cold fork", "ms", "-", None),
    ("sandbox_spaced_full_ms", "job start 100 ms apart: warm start", "ms", "-", None),
    (
        "sandbox_spaced_cold_added_ms",
        "sandbox overhead 100 ms apart, cold fork",
        "ms",
        "-",
        None,
    ),
    (
        "sandbox_spaced_added_ms",
        "sandbox overhead, starts 100 ms apart",
        "ms",
        "<= 5",
        lambda v: v <= 5,
    ),
    ("sandbox_cycle_direct_ms", "start to reaped: plain Popen", "ms", "-", None),
    ("sandbox_cycle_full_ms", "start to reaped + group removed: full", "ms", "-", None),
    ("sandbox_cycle_added_ms", "sandbox cost per job, whole cycle", "ms", "-", None),
]


# Judged on the worst run, not the median: a peak is what an operator provisions for.
WORST_CASE = {"upload_chunked_rss_growth_mib", "upload_multipart_rss_growth_mib"}


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def table(results: dict[str, Any], upload_mib: int) -> tuple[str, list[dict[str, Any]]]:
    rows, out = [], []
    size = f"{upload_mib // 1024} GiB" if upload_mib % 1024 == 0 else f"{upload_mib} MiB"
    for key, label, unit, target, check in ROWS:
        label = label.format(size=size)
        r = results.get(key)
        if r is None or r["median"] is None:
            continue
        judged = r["max"] if key in WORST_CASE else r["median"]
        status = "" if check is None else ("ok" if check(judged) else "MISSED")
        if key in WORST_CASE:
            target += " (max)"
        value = f"{fmt(r['median'])} [{fmt(r['min'])}-{fmt(r['max'])}]"
        rows.append((label, value, unit, target, status))
        out.append(
            {
                "figure": label,
                "key": key,
                "unit": unit,
                "median": r["median"],
                "min": r["min"],
                "max": r["max"],
                "runs": r["runs"],
                "target": target,
                "status": status or None,
            }
        )
    head = ("figure", "median [min-max]", "unit", "target", "")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(5)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines), out


def machine() -> dict[str, Any]:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_mib": psutil.virtual_memory().total // MIB,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


SECTIONS = ("sandbox", "dispatch", "throughput", "recovery", "upload")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small counts and a 15 s idle window (development; not the figures)",
    )
    p.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections (default all: {','.join(SECTIONS)})",
    )
    p.add_argument(
        "--upload-mib",
        dest="upload_mib_opt",
        type=int,
        default=None,
        help="artifact size (default 1024)",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    p.add_argument("--keep", action="store_true", help="keep the temp directory")
    p.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="py-spy the miner during dispatch and the first throughput run into DIR "
        "(collapsed stacks; perturbs the figures)",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.dispatch_jobs, args.dispatch_runs = (40, 2) if q else (200, 3)
    args.idle_gap = 0.03
    args.idle_s = 15.0 if q else 60.0
    args.tp_jobs, args.tp_runs = (200, 2) if q else (1000, 3)
    args.upload_mib, args.upload_runs = (128, 2) if q else (1024, 3)
    args.upload_mib = args.upload_mib_opt or args.upload_mib
    args.recovery_runs = 2 if q else 3
    args.sandbox_n, args.sandbox_rounds = (50, 2) if q else (200, 3)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")

    started = time.monotonic()
    info = machine()
    info["date"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    log(
        f"{info['cpu']}, {info['cores']} cores, kernel {info['kernel']}, "
        f"python {info['python']}, load {info['load_avg_at_start']}"
    )
    args.overlap_idle = "dispatch" in only and "throughput" in only
    tmp = Path(tempfile.mkdtemp(prefix="aitbc-bench-"))
    bench = Bench(args, tmp)
    try:
        for name in SECTIONS:
            if name not in only:
                continue
            t0 = time.monotonic()
            log(f"== {name}")
            try:
                {
                    "sandbox": bench.sandbox,
                    "dispatch": bench.dispatch_and_idle,
                    "throughput": bench.throughput,
                    "recovery": bench.recovery,
                    "upload": bench.upload,
                }[name]()
            except Exception as exc:  # report it and go on with the other sections
                log(f"{name} FAILED: {exc!r}")
                bench.details.setdefault("errors", {})[name] = repr(exc)
            bench.details.setdefault("section_s", {})[name] = round(time.monotonic() - t0, 1)
        if bench.pending_idle is not None:  # throughput did not run or skipped the baseline
            bench.finish_pending_idle(bench.start_pending_idle())
    finally:
        if bench.pending_idle is not None:
            bench.finish_pending_idle(None)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    text, rows = table(bench.results, args.upload_mib)
    info["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    info["elapsed_s"] = round(time.monotonic() - started, 1)
    header = (
        f"aitbc-miner bench {info['date']}{' (--quick)' if q else ''}: {info['cpu']}, "
        f"{info['cores']} cores, {info['memory_mib']} MiB, kernel {info['kernel']}, "
        f"python {info['python']}, load {info['load_avg_at_start']} -> {info['load_avg_at_end']}, "
        f"{info['elapsed_s']:.0f} s"
    )
    print(header)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"machine": info, "quick": q, "table": rows, "details": bench.details}, indent=2)
        + "\n"
    )
    print(f"(written to {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
