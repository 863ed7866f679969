"""Config node id: the default ``node_id`` from ``/etc/machine-id``, or a generated one kept.

For: deriving ``node-<12 hex>`` from the machine id and, where there is none, creating
``<workspace.root>/../node_id`` once (atomically, never overwriting) and reusing it.
I/O: reads the machine id file and may create the node id file and its directory.
"""

import os
import re
import secrets
import tempfile
from pathlib import Path

from .problems import ConfigError
from .values import NODE_ID_RE


def _default_node_id(machine_id_path: str, workspace_root: Path) -> str:
    try:
        machine_id = Path(machine_id_path).read_text(encoding="ascii", errors="replace")
    except OSError:
        machine_id = ""
    match = re.match(r"[0-9a-f]{12}", machine_id.strip().lower())
    if match:
        return "node-" + match[0]
    return _persisted_node_id(workspace_root.parent / "node_id")


def _persisted_node_id(path: Path) -> str:
    """Read the id generated on an earlier start, or create one; never overwrite."""
    for _ in range(3):  # a concurrent first start may create the file between our steps
        try:
            existing = path.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            existing = None
        except OSError as exc:
            raise ConfigError(
                [f"node_id: cannot read {path} ({exc.strerror or exc}); set node_id"]
            ) from None
        except UnicodeDecodeError:
            existing = ""  # reported as not a valid node id below
        if existing is not None:
            if not NODE_ID_RE.fullmatch(existing):
                raise ConfigError(
                    [
                        f"node_id: {path} does not hold a valid node id; "
                        "fix or delete it, or set node_id"
                    ]
                )
            return existing
        try:
            created = _create_exclusive(path, "node-" + secrets.token_hex(6) + "\n")
        except OSError as exc:
            raise ConfigError(
                [
                    f"node_id: cannot persist a generated id at {path} "
                    f"({exc.strerror or exc}); set node_id"
                ]
            ) from None
        if created:
            return created
    raise ConfigError([f"node_id: {path} keeps changing; set node_id"])


def _create_exclusive(path: Path, text: str) -> str | None:
    """Write a complete file at path atomically; None when one is already there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".node_id.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)  # unlike os.replace, never clobbers a concurrent writer's id
        except FileExistsError:
            return None
    finally:
        os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return text.strip()
