"""Job checks: a parsed manifest → a :class:`Plan`, and a process ending → an outcome.

For: the environment every job starts from, the GPU claim a GPU job needs (E_NOGPU
when none fits or the job got no GPU slot), the runner checks (runner enabled; cli:
the allowlist entry for command, args and env, with its caps; python: the task is
installed, no manifest env) that yield the Plan, and the verdict on how the process
ended (E_OOM, E_OUTPUT, E_TIMEOUT, E_CANCELLED/E_DISK, E_EXIT).
I/O: none of its own, except that a python plan finds the task module in the task
paths and writes the task spec into the job's workspace.
Must not: start a process, call the coordinator, or write state.json.
"""

from __future__ import annotations

import os
import signal

from ..allowlist import Denied
from ..errors import ErrorCode, JobFailure, JobGone
from ..manifest import Manifest
from ..runners import cli as cli_runner
from ..runners import python as py_runner
from ..runners.base import DEFAULT_PATH, Ending, ProcessResult
from ..workspace import Workspace
from .model import JobContext, JobHandle, Plan

PYTHON_MAX_OUTPUT_MB = 1024  # python tasks have no allowlist entry to cap their output


def job_env(m: Manifest, ws: Workspace) -> dict[str, str]:
    """The environment a job starts from: nothing of the daemon's own."""
    return {
        "PATH": DEFAULT_PATH,
        "HOME": str(ws.work),
        "TMPDIR": str(ws.tmp),
        "LANG": "C.UTF-8",
        "AITBC_JOB_ID": m.job_id,
        "AITBC_ATTEMPT": str(m.attempt),
        "AITBC_INPUT_DIR": str(ws.input),
        "AITBC_OUTPUT_DIR": str(ws.output),
        "AITBC_WORK_DIR": str(ws.work),
    }


def claim_gpus(ctx: JobContext, handle: JobHandle, m: Manifest) -> dict[str, str]:
    """Claim the job's GPUs (recorded on `handle`); returns the env that pins it to them."""
    has_slot = handle.slot == "gpu" and ctx.choose_gpus is not None
    chosen = ctx.choose_gpus(m) if has_slot else ()
    if not chosen:
        req = m.requirements
        raise JobFailure(
            ErrorCode.NOGPU,
            f"no {req.gpu_count} GPU(s) with {req.vram_mb} MiB free on this node now",
        )
    handle.gpus = tuple(g.uuid for g in chosen)
    handle.gpu_indices = tuple(g.index for g in chosen)
    return {"CUDA_VISIBLE_DEVICES": ",".join(handle.gpus), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def runner_plan(ctx: JobContext, m: Manifest, ws: Workspace, env: dict[str, str]) -> Plan:
    """The runner's checks on top of `env`: what to execute and under which caps."""
    runners = ctx.cfg.runners
    if m.runner == "cli":
        if not runners.cli.enable:
            raise JobFailure(ErrorCode.DENY, "the cli runner is disabled on this node")
        try:
            entry = ctx.allowlist().check(
                m.command or "", m.args, m.env, max_args=runners.cli.max_args
            )
        except Denied as exc:
            raise JobFailure(ErrorCode.DENY, str(exc)) from None
        env.update(m.env)
        return Plan(
            argv=cli_runner.build_argv(entry, m.args),
            timeout_s=min(m.timeout_s, entry.max_runtime_s),
            max_output_mb=entry.max_output_mb,
            env=env,
            network=entry.network,
            read_paths=(os.path.dirname(os.path.realpath(entry.path)),),
            mem_mb=m.requirements.mem_mb or ctx.cfg.resources.mem_soft_mb,
            cpu_threads=m.requirements.cpu_threads,
        )
    if not runners.python.enable:
        raise JobFailure(ErrorCode.DENY, "the python runner is disabled on this node")
    if m.env:
        raise JobFailure(ErrorCode.DENY, "python tasks take no manifest env keys")
    task = m.task or ""
    py_runner.find_task(task, runners.python.task_paths)
    spec = py_runner.write_task_spec(
        ws.path, task, runners.python.task_paths, m.task_params, ws.output
    )
    return Plan(
        argv=py_runner.build_argv(str(runners.python.venv), spec),
        timeout_s=float(m.timeout_s),
        max_output_mb=PYTHON_MAX_OUTPUT_MB,
        env=env,
        network=runners.python.network,
        read_paths=ctx.python_read,
        mem_mb=m.requirements.mem_mb or ctx.cfg.resources.mem_soft_mb,
        cpu_threads=m.requirements.cpu_threads,
    )


def cancel_failure(reason: str, floor_mb: int) -> JobFailure:
    """The outcome of a job cancelled for `reason` (floor_mb: the workspace's free-space
    floor, for E_DISK); a lost lease means the job is not ours any more."""
    if reason == "lease_lost":
        raise JobGone("lease lost while running", status=409)
    if reason == "disk":
        return JobFailure(ErrorCode.DISK, f"the workspace filesystem has < {floor_mb} MiB free")
    return JobFailure(
        ErrorCode.CANCELLED,
        f"cancelled ({reason or 'requested'})",
        retryable=reason == "shutdown",
    )


def check_exit(r: ProcessResult, plan: Plan, cancel_reason: str, floor_mb: int) -> None:
    """Raise the failure a process ending means; return when it exited 0."""
    failed = r.exit_code != 0
    if r.ending is Ending.EXITED and failed and r.oom_killed:
        raise JobFailure(ErrorCode.OOM, f"killed by the OOM killer at its {plan.mem_mb} MiB limit")
    if r.ending is Ending.EXITED and r.signal == signal.SIGXFSZ:
        raise JobFailure(
            ErrorCode.OUTPUT,
            f"wrote a file larger than its {plan.max_output_mb} MiB output cap",
        )
    if r.ending is Ending.TIMEOUT:
        raise JobFailure(ErrorCode.TIMEOUT, f"killed after its time limit of {plan.timeout_s:g} s")
    if r.ending is Ending.CANCELLED:
        raise cancel_failure(cancel_reason, floor_mb)
    if r.exit_code is None:
        raise JobFailure(ErrorCode.EXIT, f"killed by signal {r.signal}")
    if r.exit_code != 0:
        raise JobFailure(ErrorCode.EXIT, f"exited with code {r.exit_code}")
