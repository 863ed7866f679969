"""Job starts prepared ahead of time: a spare cgroup with a fork-server stem inside.

I/O: the cgroup filesystems and the fork server. Moving a process into a
cgroup waits for an RCU grace period, about 10 ms per hierarchy on an idle
host (v2 tracking plus v1 memory and pids here: ~25 ms), and a private network
namespace costs ~1.5 ms. Both are the same for every job, so `WarmPool` pays
them between jobs: it keeps one or two spare job groups (each spanning every
hierarchy in use), each with a *stem* (a fork server child that has already
joined it and entered its namespace) waiting.
A job takes one, writes its own limits into the group and hands the stem its
argv; only rlimits, Landlock and exec remain on its start path. Spares enter a
network namespace when jobs get one (the default); once a job allowed the
network has started cold, one spare without a namespace is kept for the next.

Spare groups are named `warm-<n>.<daemon pid>-<token>` (cgroups.owner_tag). A
daemon that crashed leaves its (then empty) spares behind; the next one removes
them at start (cgroups.remove_stale), leaving alone those of other live daemons
sharing the hierarchy.
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass

import structlog
import trio

from .cgroups import LIVE_TOKENS, CgroupSupport, JobCgroup, owner_tag
from .spawner import ForkServer, StemRef

log = structlog.get_logger(__name__)

PREFIX = "warm-"
RETRY_S = 30.0  # after a failed refill (cgroup removed under us, fork server restarting)


@dataclass(frozen=True)
class Warm:
    """A spare job start: the group and the stem waiting inside it."""

    cgroup: JobCgroup
    stem: int  # pid; becomes the job's pid when it is used
    token: int  # tells this stem from a later one that got the same pid
    netns: bool  # the stem is in a private network namespace

    @property
    def ref(self) -> StemRef:
        """What a spawn request names (`limits["stem"]`)."""
        return self.stem, self.token


class WarmPool:
    """Keeps `size` warm starts ready; one for every job that fits, refilled behind it."""

    def __init__(
        self, support: CgroupSupport, server: ForkServer, *, netns: bool, size: int = 1
    ) -> None:
        self._support = support
        self._server = server
        self._netns = netns
        # How many spares of each kind (in a private netns or not) to keep: `size` of
        # the kind most jobs need; one of the other once a job has asked for it.
        self._targets: dict[bool, int] = {netns: size}
        self._ready: list[Warm] = []
        self._wanted = trio.Event()
        self._token = secrets.token_hex(3)
        LIVE_TOKENS.add(self._token)
        self._seq = itertools.count()
        self.failures = 0

    @property
    def ready(self) -> int:
        return len(self._ready)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refill forever (until cancelled); `started` once the first spare is ready or failed."""
        started = False
        try:
            while True:
                failed = False
                while not failed and (kind := self._missing()) is not None:
                    try:
                        self._ready.append(await self._make(kind))
                    except Exception as exc:  # never the daemon's end: jobs then start cold
                        self.failures += 1
                        log.warning("warm_start_failed", error=repr(exc), retry_in_s=RETRY_S)
                        failed = True
                if not started:
                    task_status.started()
                    started = True
                self._wanted = trio.Event()
                if failed:
                    with trio.move_on_after(RETRY_S):
                        await self._wanted.wait()
                else:
                    await self._wanted.wait()
        finally:
            with trio.CancelScope(shield=True):
                await self.aclose()

    def _missing(self) -> bool | None:
        """A kind of spare (netns or not) below its target, if any."""
        for netns, target in self._targets.items():
            if sum(1 for w in self._ready if w.netns == netns) < target:
                return netns
        return None

    async def _make(self, netns: bool) -> Warm:
        name = f"{PREFIX}{next(self._seq)}.{owner_tag(self._token)}"
        group = await trio.to_thread.run_sync(JobCgroup.make, self._support, name)
        try:
            pid, token = await self._server.prestart(group.procs_files, netns)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(group.remove)
            raise
        return Warm(group, pid, token, netns)

    async def take(self, files: dict[str, dict[str, str]], *, netns: bool) -> Warm | None:
        """A warm start with the job's limits written into its group, or None (start cold)."""
        for i, warm in enumerate(self._ready):
            if warm.netns == netns:
                del self._ready[i]
                self._wanted.set()
                try:
                    await trio.to_thread.run_sync(warm.cgroup.apply, files)
                except OSError as exc:  # e.g. a v1 limit below what the stem already uses
                    log.warning("warm_start_unusable", error=str(exc), action="start cold")
                    with trio.CancelScope(shield=True):
                        await self.drop(warm)
                    return None
                return warm
        if not netns and netns not in self._targets:  # (a netns kind exists only by default)
            # The first job of its kind starts cold; keep one spare for the next ones.
            log.info("warm_kind_added", netns=netns)
            self._targets[netns] = 1
            self._wanted.set()
        return None

    async def forget(self, warm: Warm) -> None:
        """After a job that took `warm`: kill its stem if the job never started it.

        The group itself is the job's (recorded in state.json) and removed by it.
        """
        try:
            await self._server.discard(warm.ref)
        except Exception as exc:  # a broken fork server is restarted by its next call
            log.warning("warm_discard_failed", stem=warm.stem, error=repr(exc))

    async def drop(self, warm: Warm) -> None:
        await self.forget(warm)
        await trio.to_thread.run_sync(warm.cgroup.remove)

    async def aclose(self) -> None:
        """Kill the spare stems and remove their groups (at shutdown)."""
        ready, self._ready = self._ready, []
        for warm in ready:
            try:
                await self.drop(warm)
            except OSError as exc:  # the group stays; a later start removes it
                log.warning("warm_drop_failed", stem=warm.stem, error=str(exc))
        LIVE_TOKENS.discard(self._token)
