"""Runs the mock: holds the shared runtime (state, signer, faults, wake-ups), builds the ASGI
app, serves it with hypercorn's trio worker, expires leases on a timer, announces readiness
and stops cleanly on SIGINT/SIGTERM. No protocol decisions are made here."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette

from . import admin, api, transfer
from .common import Options, atomic_write
from .faults import FaultMiddleware, FaultTable
from .signing import HMAC_KEY_ID, Signer, load_or_create_key
from .state import State


class Notifier:
    """A level-free wake-up: every waiter is released by the next notify()."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class Coordinator:
    """The runtime shared by all request handlers (reachable as app.state.coord)."""

    def __init__(self, opts: Options, state: State, signer: Signer, data_dir: Path) -> None:
        self.opts = opts
        self.state = state
        self.signer = signer
        self.data_dir = data_dir
        self.faults = FaultTable(random.Random(opts.seed))
        self.board_changed = Notifier()  # enqueue, requeue, hand-out, final, shutdown
        self.shutting_down = trio.Event()
        self.inflight: dict[str, trio.Event] = {}  # idempotency scopes being processed
        self.result_lock = trio.Lock()
        self._upload_locks: dict[str, trio.Lock] = {}
        self.waiting_pulls = 0  # long polls being held right now
        self.base = ""  # http://host:port, known once bound

    @property
    def api_url(self) -> str:
        return self.base + "/api/v1"

    @property
    def admin_url(self) -> str:
        return self.base + "/admin"

    def now(self) -> float:
        return time.time()

    def tick(self) -> None:
        """Expire overdue leases now (also done by the lease timer)."""
        if self.state.jobs.expire(self.now()):
            self.board_changed.notify()
            self.persist()

    def persist(self) -> None:
        if self.opts.state_file is not None:
            self.state.save(self.opts.state_file)

    def upload_lock(self, upload_id: str) -> trio.Lock:
        return self._upload_locks.setdefault(upload_id, trio.Lock())

    def log(self, **fields: Any) -> None:
        if self.opts.log_requests:
            print(json.dumps({"ts": self.now(), **fields}), file=sys.stderr, flush=True)

    def stop(self) -> None:
        self.shutting_down.set()
        self.board_changed.notify()


def build_app(coord: Coordinator) -> FaultMiddleware:
    app = Starlette(routes=[*api.routes(), *transfer.routes(), *admin.routes()])
    app.state.coord = coord

    def count(kind: str) -> None:
        coord.state.stats.faults[kind] += 1

    return FaultMiddleware(app, coord.faults, count)


async def lease_timer(coord: Coordinator, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Sleep until the earliest lease deadline or a board change, then expire leases."""
    task_status.started()
    while True:
        coord.tick()
        deadline = coord.state.jobs.next_deadline()
        timeout = math.inf if deadline is None else max(0.0, deadline - time.time()) + 0.005
        with trio.move_on_after(timeout):
            await coord.board_changed.wait()


async def _stop_on_signal(signals: Any, coord: Coordinator) -> None:
    async for _ in signals:
        coord.stop()
        return


def _public_base(bind: str) -> str:
    for wildcard in ("://0.0.0.0:", "://[::]:"):
        bind = bind.replace(wildcard, "://127.0.0.1:")
    return bind


def _hypercorn_config(opts: Options) -> HypercornConfig:
    cfg = HypercornConfig()
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    cfg.bind = [f"{host}:{opts.port}"]
    cfg.accesslog = None
    cfg.errorlog = "-"
    cfg.loglevel = "WARNING"
    cfg.graceful_timeout = 2.0
    if opts.certfile is not None and opts.keyfile is not None:
        cfg.certfile, cfg.keyfile = str(opts.certfile), str(opts.keyfile)
    return cfg


async def serve(opts: Options, announce: Callable[[str], None] = print) -> None:
    """Serve until SIGINT/SIGTERM. `announce` receives the one-line ready JSON."""
    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # malformed bodies are 400s
    scratch = None
    if opts.data_dir is not None:
        data_dir = opts.data_dir
    elif opts.state_file is not None:
        data_dir = Path(f"{opts.state_file}.d")
    else:
        data_dir = scratch = Path(tempfile.mkdtemp(prefix="mock-coordinator-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file = opts.signing_key_file
    if key_file is None and scratch is None:
        key_file = data_dir / "signing-key.pem"
    signer = Signer(load_or_create_key(key_file), opts.hmac_secret, key_id=opts.key_id)
    state = State(
        lease_s=opts.lease_s,
        max_attempts=opts.max_attempts,
        token_ttl_s=opts.token_ttl_s,
        pending_by_default=opts.pending_by_default,
    )
    if opts.state_file is not None:
        state.load(opts.state_file)
    coord = Coordinator(opts, state, signer, data_dir)
    app = build_app(coord)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, signals, coord)
                await nursery.start(lease_timer, coord)
                async with trio.open_nursery() as http:
                    binds = await http.start(
                        partial(
                            hypercorn.trio.serve,
                            app,
                            _hypercorn_config(opts),
                            shutdown_trigger=coord.shutting_down.wait,
                        )
                    )
                    coord.base = _public_base(binds[0])
                    ready = {
                        "event": "mock_ready",
                        "url": coord.api_url,
                        "admin_url": coord.admin_url,
                        "key_id": signer.key_id,
                        "public_key": signer.public_key,
                    }
                    if opts.hmac_secret is not None:
                        ready["hmac_key_id"] = HMAC_KEY_ID
                    ready["pid"] = os.getpid()
                    line = json.dumps(ready)
                    if opts.ready_file is not None:
                        atomic_write(opts.ready_file, line.encode() + b"\n")
                    announce(line)
                nursery.cancel_scope.cancel()
        coord.persist()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
