"""sd_notify for systemd (READY, STATUS, STOPPING, WATCHDOG) via systemd-python.

I/O: one datagram per call to $NOTIFY_SOCKET. A no-op when not started by
systemd or when systemd-python is not installed (it is an optional extra).
"""

from __future__ import annotations

import os

try:
    from systemd import daemon as _daemon
except ImportError:  # pragma: no cover - depends on the optional extra
    _daemon = None


def available() -> bool:
    return _daemon is not None and bool(os.environ.get("NOTIFY_SOCKET"))


def notify(*fields: str) -> bool:
    """Send `KEY=value` fields; returns whether systemd got them."""
    if not available():
        return False
    return bool(_daemon.notify("\n".join(fields)))
