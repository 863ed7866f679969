"""The daemon's one nursery owner: register, heartbeat, pull, run jobs, drain.

For: :class:`Agent`, built from the configuration and the allowlist by __main__,
whose :meth:`Agent.run` is the daemon's whole lifetime. Job work lives in
aitbc_miner.jobs, wire details in coordinator.py, decisions in pure modules.
Signals: the first SIGTERM/SIGINT drains (stop pulling, heartbeat ``draining``,
let jobs finish up to ``shutdown.grace_s``, cancel the rest, deregister, exit 0);
a second one cancels running jobs at once; SIGHUP reloads the allowlist.
I/O: orchestration only; each long-lived loop belongs to one part.
Must not: run job work itself, or let a job's or a loop's error end the daemon.

This package is the public import path; its modules are the parts of Agent:
``daemon`` (Agent: shared state, capacity, status, watchdog marks, ``run``),
``heartbeat`` (registration, heartbeat loop, token renewal, deregistration),
``pulling`` (pull loop, slot accounting, the task that drives each job),
``recovering`` (crash recovery at start-up, retention sweeper), ``gpus`` (GPU
claims, the sweep after a GPU job), ``drain`` (signals, drain, forced stop,
allowlist reload), ``wiring`` (the JobContext, the sandbox report) and ``base``
(the state the parts share, declared once) [pure].
"""

# `X as X` marks a re-export: the names the single-module agent defined stay importable
# from here; __all__ is the supported surface.
from .daemon import Agent
from .drain import REPORT_BOUND_S as REPORT_BOUND_S
from .pulling import DISK_RECHECK_S as DISK_RECHECK_S
from .wiring import python_read_paths as python_read_paths

__all__ = ["Agent"]
