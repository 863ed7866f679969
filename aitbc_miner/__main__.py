"""Command line: `aitbc-miner run | probe | check-config | version`.

Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage. Every
failure prints one line saying why (plus one line per config problem).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence

from . import __version__

EXIT_OK, EXIT_RUNTIME, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aitbc-miner",
        description="Worker daemon for the AITBC compute network.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", required=True, help="path to config.yaml")
    probe = sub.add_parser("probe", help="print this node's capability descriptor as JSON")
    probe.add_argument("--config", "-c", help="config.yaml (defaults apply without one)")
    check = sub.add_parser("check-config", help="validate the config and every allowlist file")
    check.add_argument("--config", "-c", required=True, help="path to config.yaml")
    check.add_argument(
        "--print", action="store_true", help="print the effective config (secrets masked)"
    )
    sub.add_parser("version", help="print the version")
    return parser


def _fail(code: int, message: str) -> int:
    print(f"aitbc-miner: {message}", file=sys.stderr)
    return code


# Stop/reload signals that arrive while the daemon is still importing and
# starting up are remembered here and acted on once the event loop listens,
# instead of killing a half-started process (exit by SIGTERM, no deregister).
_EARLY_SIGNALS: list[int] = []


def _remember_signal(signum: int, _frame: object) -> None:
    _EARLY_SIGNALS.append(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _remember_signal)
    if args.command == "version":
        print(f"aitbc-miner {__version__}")
        return EXIT_OK
    from .allowlist import AllowlistError, load_allowlist
    from .config import ConfigError, load_config

    environ = dict(os.environ)
    if args.command == "probe":
        # probe never talks to the coordinator: it needs no bootstrap token.
        environ.setdefault("AITBC_MINER_COORDINATOR__AUTH_TOKEN", "unused-by-probe")
    try:
        cfg = load_config(getattr(args, "config", None), environ)
    except ConfigError as exc:
        print(
            f"aitbc-miner: invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr
        )
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        allowlist = load_allowlist(
            cfg.runners.cli.allowlist_files if cfg.runners.cli.enable else []
        )
    except AllowlistError as exc:
        print(f"aitbc-miner: invalid allowlist ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_CONFIG

    if args.command == "check-config":
        return _check_config(cfg, allowlist, show=args.print)
    if args.command == "probe":
        return _probe(cfg)
    return _run(cfg, allowlist)


def _check_config(cfg, allowlist, *, show: bool) -> int:
    from .config import redacted_dump

    for warning in allowlist.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if show:
        print(json.dumps(redacted_dump(cfg), indent=2, default=str))
    names = ", ".join(sorted(allowlist.entries)) or "none"
    print(f"config ok: node_id={cfg.node_id}, allowlist entries: {names}")
    return EXIT_OK


def _probe(cfg) -> int:
    from . import logs, probe
    from .gpu import GpuInventory

    logs.configure("warning", json=cfg.logging.json, stream=sys.stderr)  # stdout is the JSON

    inventory = GpuInventory(enabled=cfg.gpu.enable)
    gpus = inventory.snapshot()
    usable = sum(1 for g in gpus if g.schedulable)
    runners = [
        n
        for n, on in (("cli", cfg.runners.cli.enable), ("python", cfg.runners.python.enable))
        if on
    ]
    desc = probe.descriptor(
        node_id=cfg.node_id,
        gpus=gpus,
        runners=runners,
        slots={
            "cpu": cfg.resources.max_concurrent_cpu,
            "gpu": min(cfg.resources.max_concurrent_gpu, usable * cfg.gpu.jobs_per_gpu),
        },
        workspace_root=str(cfg.workspace.root),
    )
    print(json.dumps(desc, indent=2))
    if not usable:  # say why on stderr (stdout stays the JSON): gpu-smoke.sh shows it
        why = [f"GPU {g.index}: {'MIG mode' if g.mig else g.reason}" for g in gpus]
        print(
            f"gpu: none schedulable: {'; '.join(why) or inventory.reason or 'NVML lists none'}",
            file=sys.stderr,
        )
    return EXIT_OK


def _run(cfg, allowlist) -> int:
    import structlog
    import trio

    from . import logs
    from .agent import Agent
    from .sandbox.cgroups import CgroupUnavailable

    try:
        # Under systemd, records go to journald with structured fields (NODE_ID,
        # JOB_ID, EVENT, ERROR_CODE, PRIORITY) instead of plain stdout lines.
        logs.configure(
            cfg.logging.level,
            json=cfg.logging.json,
            path=cfg.logging.path,
            journald=logs.journald_wanted(os.environ),
        )
    except OSError as exc:
        return _fail(EXIT_CONFIG, f"logging.path: cannot open {cfg.logging.path}: {exc.strerror}")
    logs.register_secret(cfg.coordinator.auth_token.get_secret_value())
    for hmac_key in cfg.security.hmac_keys.values():
        logs.register_secret(hmac_key.get_secret_value())
    structlog.contextvars.bind_contextvars(node_id=cfg.node_id)
    for warning in allowlist.warnings:
        logs.get_logger().warning("allowlist_warning", detail=warning)
    _not_dumpable()
    try:
        agent = Agent(cfg, allowlist, early_signals=_EARLY_SIGNALS)
    except CgroupUnavailable as exc:
        return _fail(EXIT_CONFIG, f"resources.cgroup: {exc}")
    try:
        trio.run(agent.run)
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:
        logs.get_logger().exception("miner_crashed")
        return _fail(EXIT_RUNTIME, f"crashed: {type(exc).__name__}: {exc}")
    return EXIT_OK


def _not_dumpable() -> None:
    """PR_SET_DUMPABLE=0: /proc/<daemon>/environ, mem and fds become root-only, so a
    job running under the same uid cannot read the bootstrap token from them."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        print("aitbc-miner: warning: could not make the daemon non-dumpable", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
