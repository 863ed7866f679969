"""Run the real miner CLI as on a host without user/network namespaces (tests only).

    python -m tests.support.no_netns_launcher run ...

Such hosts are common (Ubuntu 24.04 restricts unprivileged user namespaces;
containers without CAP_SYS_ADMIN), but this VM's root can always make one. The
fork server's answer to "can jobs get a private network namespace?" is replaced
by "unavailable" right after it starts; nothing else changes, so the daemon
takes the same decisions it would take on such a host.
"""

from __future__ import annotations

import sys


def main() -> int:
    from aitbc_miner.sandbox import spawner

    real_open = spawner.ForkServer.open

    async def open_without_netns(self: spawner.ForkServer) -> None:
        await real_open(self)
        self.netns = "unavailable"

    spawner.ForkServer.open = open_without_netns  # type: ignore[method-assign]
    from aitbc_miner.__main__ import main as miner_main

    return miner_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
