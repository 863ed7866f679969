"""Drive one job through the lifecycle: ack, check, prepare, run, upload, report.

For: :class:`JobRun` (one job, fresh from a pull or found after a crash) and the
values the agent builds and shares with it (:class:`JobContext`, :class:`JobHandle`,
:func:`job_handle_for`). Decisions come from pure code (lifecycle table,
manifest/allowlist/signature checks); this package only sequences them, persists
state.json before each phase's work, and turns every failure into an outcome
reported to the coordinator.
I/O: coordinator calls, workspace, processes.
Must not: let anything a job or a coordinator sends raise out of ``JobRun.run()``.

This package is the public import path; its modules are:
``model`` (JobHandle, JobContext, Plan, the state JobRun's parts share) [pure],
``checks`` (manifest → Plan: runners, allowlist, GPU claim; exit → outcome),
``execute`` (inputs, cgroup and warm start, the process, progress, disk watch) [io],
``report`` (artifact upload, failure report, state.json writes, job_finished) [io],
``run`` (JobRun: the sequence of a fresh job, and recovery of one found job) [io].
"""

# `X as X` marks a re-export: the names the single-module jobs defined stay importable
# from here; __all__ is the supported surface.
from .checks import PYTHON_MAX_OUTPUT_MB as PYTHON_MAX_OUTPUT_MB
from .execute import DISK_CHECK_S as DISK_CHECK_S
from .execute import INPUT_DEFAULT_MAX_MB as INPUT_DEFAULT_MAX_MB
from .model import JobContext, JobHandle, job_handle_for
from .model import Plan as Plan
from .model import utcnow as utcnow
from .report import LOG_TAIL_BYTES as LOG_TAIL_BYTES
from .run import JobRun

__all__ = ["JobContext", "JobHandle", "JobRun", "job_handle_for"]
