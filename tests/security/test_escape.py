"""The escape suite: real hostile jobs against the real miner and mock coordinator.

Each test asserts the exact error code *and* that the attack had no effect,
and that the daemon still serves the next job. Runs with the sandbox this host
offers: the fork server's rlimits, cgroup2 tracking + cgroup.kill, the v1
memory and pids controllers, a private network namespace and Landlock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.jobs import pid_gone as gone
from tests.support.jobs import sh_job as sh
from tests.support.jobs import wait_final
from tests.support.minerproc import start_miner
from tests.support.wait import wait_for

# A narrow writer whose output cap is small enough to hit on purpose.
SMALL_OUTPUT = """
name: smallout
command:
  path: "/bin/sh"
args:
  - ["-c", ".{1,2000}"]
max_output_mb: 5
max_runtime_s: 60
"""


def run(mock, job: dict, timeout: float = 60) -> dict:
    mock.admin.enqueue(job, retry=False)
    return wait_final(mock, job["job_id"], timeout)


def code(job: dict) -> str | None:
    return job["fails"][-1]["error_code"] if job["fails"] else None


def still_serving(mock, name: str) -> None:
    assert run(mock, sh(f"after-{name}", "echo ok"))["state"] == "succeeded"


@pytest.fixture(params=["warm", "cold"])
def sandboxed(request, mock, miner_factory, tmp_path):
    """A sandboxed miner; every attack runs against warm starts and against cold forks."""
    extra = tmp_path / "allowlist.extra.d"
    extra.mkdir()
    (extra / "smallout.yaml").write_text(SMALL_OUTPUT)
    miner = miner_factory(
        mock,
        AITBC_MINER_RESOURCES__MAX_PIDS="64",
        AITBC_MINER_RESOURCES__WARM_STARTS=str(request.param == "warm").lower(),
        AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES=json.dumps(
            [
                str(tmp_path / "allowlist.test.d" / "*.yaml"),
                str(extra / "*.yaml"),
                str(Path(__file__).resolve().parents[2] / "allowlist.d" / "*.yaml"),
            ]
        ),
    )
    sandbox = miner.wait_event("sandbox")
    return miner, sandbox


def test_sandbox_reports_what_it_enforces(sandboxed, mock):
    miner, sandbox = sandboxed
    for key in ("tracking", "memory", "cpu", "pids", "network", "filesystem", "signals", "rlimits"):
        assert key in sandbox, key
    import httpx

    health = httpx.get(miner.health_url + "/healthz").json()
    assert health["sandbox"]["tracking"] == sandbox["tracking"]


def test_jobs_start_inside_the_groups_recorded_for_them(sandboxed, mock):
    """The job's first instruction already runs in its cgroups (prepared ahead when warm)."""
    miner, sandbox = sandboxed
    if sandbox["tracking"] == "process group" and sandbox["memory"].startswith("rlimit"):
        pytest.skip("no per-job cgroups on this host")
    job = run(mock, sh("grp-1", "cat /proc/self/cgroup > groups.txt"))
    assert job["state"] == "succeeded", job["fails"]
    ws = miner.workspace / "grp-1"
    groups = (ws / "work" / "groups.txt").read_text()
    recorded = json.loads((ws / "state.json").read_text())["cgroup"]
    name = Path(recorded).name
    kind = "warm" if miner.env["AITBC_MINER_RESOURCES__WARM_STARTS"] == "true" else "cold"
    warm = kind == "warm"
    assert name.startswith("warm-" if warm else "grp-1.a"), recorded
    assert re.search(rf"\.{miner.proc.pid}-[0-9a-f]{{6}}$", name), recorded  # the owner tag
    assert f"/{name}\n" in groups, groups  # the recorded group, where recovery would look
    import httpx

    metrics = httpx.get(miner.health_url + "/metrics").text
    assert f'aitbc_miner_job_starts_total{{start="{kind}"}} 1.0' in metrics, metrics
    assert not Path(recorded).exists()  # removed after the job


def test_fork_bomb_is_contained(sandboxed, mock):
    miner, _ = sandboxed
    job = run(mock, sh("forkbomb", "b() { b | b & }; b; sleep 60", timeout_s=4), timeout=60)
    assert code(job) == "E_TIMEOUT", job["fails"]
    # pids.max (64 here) stopped it from taking the machine: forks failed inside the job.
    assert (
        "fork" in job["fails"][-1]["logs_tail"].lower()
        or "resource" in job["fails"][-1]["logs_tail"].lower()
    )
    work_dir = str(miner.workspace / "forkbomb" / "work")
    leftovers = [p for p in psutil.process_iter() if _work_dir_of(p) == work_dir]
    assert not leftovers, leftovers
    still_serving(mock, "forkbomb")


def test_memory_bomb_is_e_oom(sandboxed, mock):
    script = "exec python3 -c 'b = bytearray(400 * 1024 * 1024); import time; time.sleep(30)'"
    job = run(mock, sh("membomb", script, requirements={"mem_mb": 64}))
    assert code(job) == "E_OOM", job["fails"]
    still_serving(mock, "membomb")


def test_cpu_spin_past_timeout_is_e_timeout(sandboxed, mock):
    job = run(mock, sh("spin", "while :; do :; done", timeout_s=2))
    assert code(job) == "E_TIMEOUT"
    still_serving(mock, "spin")


def test_setsid_double_fork_cannot_outlive_the_job(sandboxed, mock):
    miner, _ = sandboxed
    script = "setsid sh -c 'sleep 300 & echo $! > escaped.pid; wait' & sleep 0.5; echo done"
    job = run(mock, sh("escape-1", script))
    assert job["state"] == "succeeded"
    pid = int((miner.workspace / "escape-1" / "work" / "escaped.pid").read_text())
    wait_for(lambda: gone(pid), timeout=10, what="escaped grandchild killed by cgroup.kill")


def test_huge_output_is_stopped_by_the_file_size_cap(sandboxed, mock):
    miner, _ = sandboxed
    job = run(
        mock,
        {
            "job_id": "bigwrite",
            "runner": "cli",
            "timeout_s": 60,
            "command": "smallout",
            "args": ["-c", "exec head -c 10G /dev/zero > out.bin"],
            "artifacts": [{"path": "out.bin"}],
        },
    )
    assert code(job) == "E_OUTPUT", job["fails"]
    size = (miner.workspace / "bigwrite" / "work" / "out.bin").stat().st_size
    assert size <= 5 * 1024 * 1024
    still_serving(mock, "bigwrite")


def test_filling_the_disk_is_e_disk(mock, miner_factory):
    free_mb = psutil.disk_usage("/tmp").free // (1024 * 1024)
    miner = miner_factory(mock, AITBC_MINER_WORKSPACE__MIN_FREE_MB=str(free_mb - 64))
    job = run(mock, sh("diskfill", "head -c 200M /dev/zero > fill.bin; sleep 30"))
    assert code(job) == "E_DISK", job["fails"]
    assert job["fails"][-1]["retryable"] is True
    assert miner.proc.poll() is None


def test_artifact_hard_link_to_a_daemon_file_is_e_output(sandboxed, mock):
    job = run(
        mock,
        sh(
            "hardlink",
            "ln ../state.json out.txt || ln /etc/hostname out.txt",
            artifacts=[{"path": "out.txt"}],
        ),
    )
    assert code(job) in ("E_OUTPUT", "E_EXIT"), job["fails"]
    assert not mock.admin.job("hardlink")["artifacts"]


@pytest.fixture
def unprivileged_miner(mock, tmp_path):
    """A miner running as `nobody` (as the hardened unit runs it as its own user)."""
    if os.geteuid() != 0 or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root to start a miner as nobody, and Debian's python3")
    home = Path(tempfile.mkdtemp(prefix="aitbc-unpriv-"))
    (home / "allow").mkdir()
    (home / "allow" / "sh.yaml").write_text(
        'name: sh\ncommand:\n  path: "/bin/sh"\nargs:\n  - ["-c", ".{1,4000}"]\n'
    )
    for path in [home, *home.rglob("*")]:
        os.chown(path, 65534, 65534)
    miner = start_miner(
        home,
        mock,
        user="nobody",
        node_id="node-unpriv",
        AITBC_MINER_WORKSPACE__ROOT=str(home / "ws" / "jobs"),
        AITBC_MINER_CACHE__ROOT=str(home / "ws" / "cache"),
        AITBC_MINER_RUNNERS__CLI__ALLOWLIST_FILES=json.dumps([str(home / "allow" / "*.yaml")]),
    )
    try:
        yield miner
    finally:
        miner.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_job_cannot_read_other_workspaces_home_or_daemon_state(unprivileged_miner, mock):
    miner = unprivileged_miner
    run(mock, sh("victim", "echo secret-of-victim > private.txt"))
    ws = miner.workspace
    script = (
        f"cat {ws}/victim/work/private.txt; echo rc1=$?; "
        f"cat {ws}/victim/state.json; echo rc2=$?; "
        "ls /root; echo rc3=$?; "
        f"cat /proc/{miner.proc.pid}/environ; echo rc4=$?; "
        "echo test > ../state.json; echo rc5=$?; "
        "ls /tmp; echo rc6=$?"
    )
    job = run(mock, sh("snoop", script))
    assert job["state"] == "succeeded"
    log = (ws / "snoop" / "logs" / "exec.log").read_text()
    assert "secret-of-victim" not in log and "lease_id" not in log
    assert "MINER_AUTH" not in log and "dev-bootstrap-token" not in log
    for n in range(1, 7):
        assert f"rc{n}=0" not in log, log
    # The same job as the daemon's own user could read them without the sandbox:
    assert (ws / "victim" / "work" / "private.txt").read_text() == "secret-of-victim\n"


def test_env_key_outside_allowlist_is_e_deny(sandboxed, mock):
    job = run(mock, sh("ldpreload", "touch preload-ran", env={"LD_PRELOAD": "/tmp/evil.so"}))
    assert code(job) == "E_DENY"


def test_shell_metacharacters_reach_the_program_literally(sandboxed, mock):
    miner, _ = sandboxed
    args = ["; touch pwned", "$(touch pwned2)", "`id`", "a && b", "| cat", "> x", "'\"*?"]
    job = run(
        mock, {"job_id": "meta", "runner": "cli", "timeout_s": 10, "command": "echo", "args": args}
    )
    assert job["state"] == "succeeded"
    log = (miner.workspace / "meta" / "logs" / "exec.log").read_text()
    assert log == " ".join(args) + "\n"
    assert not list((miner.workspace / "meta" / "work").glob("pwned*"))


def test_job_inherits_no_descriptor_of_the_daemon_or_fork_server(sandboxed, mock):
    """A leaked fork-server socket would let a job read spawn requests and forge replies."""
    miner, _ = sandboxed
    script = (
        "exec python3 -c \"import os; d = '/proc/self/fd'; "
        "rows = [f'{n} {os.readlink(d + chr(47) + n)}' for n in os.listdir(d) "
        "if os.path.exists(d + chr(47) + n)]; open('fds.txt', 'w').write(chr(10).join(rows))\""
    )
    job = run(mock, sh("fdleak", script))
    assert job["state"] == "succeeded", job["fails"]
    lines = (miner.workspace / "fdleak" / "work" / "fds.txt").read_text().splitlines()
    fds = dict(line.split(" ", 1) for line in lines)
    assert {"0", "1", "2"} <= set(fds), fds
    assert fds["0"] == "/dev/null"
    # Beyond stdin/stdout/stderr: at most the directory python opened to list them.
    extra = {n: target for n, target in fds.items() if n not in ("0", "1", "2")}
    assert all(t.startswith("/proc/") for t in extra.values()), extra
    assert not any("socket:" in t for t in fds.values()), fds
    still_serving(mock, "fdleak")


def test_job_cannot_signal_the_daemon_or_the_fork_server(sandboxed, mock):
    """Same uid, so only Landlock's signal scope (ABI 6) stops kill -STOP/-KILL of them."""
    miner, sandbox = sandboxed
    if not sandbox["signals"].startswith("own processes"):
        pytest.skip(f"this kernel cannot scope signals: {sandbox['signals']}")
    server = psutil.Process(miner.proc.pid).children()[0]
    script = (
        f"kill -0 {server.pid}; echo server=$?; kill -STOP {miner.proc.pid}; echo daemon=$?; "
        "sleep 1 & kill -0 $!; echo own=$?"
    )
    job = run(mock, sh("signals", script))
    assert job["state"] == "succeeded", job["fails"]
    out = (miner.workspace / "signals" / "logs" / "exec.log").read_text()
    assert "server=1" in out and "daemon=1" in out, out
    assert "own=0" in out, out  # its own children it may still signal
    assert psutil.Process(miner.proc.pid).status() != psutil.STATUS_STOPPED
    still_serving(mock, "signals")


@contextlib.contextmanager
def loopback_listener() -> Iterator[tuple[int, list[object]]]:
    """A TCP listener on 127.0.0.1: (port, connections it accepted)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(0.2)
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join(2)
        server.close()


def connect_script(port: int) -> str:
    return (
        "exec python3 -c \"import socket; socket.create_connection(('127.0.0.1', "
        f"{port}), timeout=3); print('CONNECTED')\""
    )


def test_network_false_job_cannot_reach_a_loopback_listener(sandboxed, mock):
    with loopback_listener() as (port, accepted):
        job = run(mock, sh("netjob", connect_script(port)))
        assert code(job) == "E_EXIT"
        assert "CONNECTED" not in job["fails"][-1]["logs_tail"]
        assert accepted == []


def test_without_namespaces_network_false_still_blocks_tcp(mock, miner_factory):
    """On a host without user/network namespaces, Landlock (ABI >= 4) denies TCP."""
    miner = miner_factory(mock, launcher="tests.support.no_netns_launcher")
    sandbox = miner.wait_event("sandbox")
    if not sandbox["network"].startswith("TCP only"):
        pytest.skip(f"Landlock cannot restrict TCP here: {sandbox['network']}")
    assert miner.find("network_isolation_unavailable"), "the operator is not told"
    with loopback_listener() as (port, accepted):
        job = run(mock, sh("netjob-nons", connect_script(port)))
        assert code(job) == "E_EXIT", job
        assert "PermissionError" in job["fails"][-1]["logs_tail"]
        assert accepted == []
    # Proof that it ran in the host's network (no namespace): it sees the host's interfaces.
    job = run(mock, sh("ifaces-nons", "cat /proc/net/dev"))
    assert job["state"] == "succeeded"
    dev = (miner.workspace / "ifaces-nons" / "logs" / "exec.log").read_text()
    names = {line.split(":")[0].strip() for line in dev.splitlines()[2:] if ":" in line}
    assert names - {"lo"}, dev
    still_serving(mock, "nons")


def _work_dir_of(proc: psutil.Process) -> str | None:
    """The workspace a job process belongs to (unique per test run, unlike job ids)."""
    try:
        return proc.environ().get("AITBC_WORK_DIR")
    except (psutil.Error, OSError):
        return None
