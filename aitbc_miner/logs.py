"""Logging set-up: structlog JSON lines, configured once at start.

Every line carries `ts, level, node_id, job_id, event` first. Output goes to
stdout, or to journald when the daemon runs under systemd (`journald_wanted`):
then every record is one journal entry whose MESSAGE is the same JSON line and
whose fields are NODE_ID, JOB_ID, EVENT, ERROR_CODE, PRIORITY (from the level)
and every other key upper-cased (`journal_fields`, pure). Optionally records
also go to a JSONL file that logrotate may rotate under us (WatchedFileHandler
reopens it). Secret values registered with `register_secret` are masked in
every field, as a second line of defence behind never logging them at all.
"""

from __future__ import annotations

import json as _json
import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

_FIRST = ("ts", "level", "node_id", "job_id", "event")
_secrets: set[str] = set()
_MASK = "***"


def register_secret(value: str | None) -> None:
    """Mask `value` wherever it would appear in a log line from now on."""
    if value and len(value) >= 4:
        _secrets.add(value)


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, _MASK)
        return value
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(v) for v in value]
    return value


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _secrets:
        for key, value in event_dict.items():
            event_dict[key] = _mask(value)
    return event_dict


def _order(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ordered = {k: event_dict.pop(k) for k in _FIRST if k in event_dict}
    ordered.update(event_dict)
    return ordered


# --- journald ----------------------------------------------------------------------------

SYSLOG_IDENTIFIER = "aitbc-miner"
# syslog priorities (journald's PRIORITY field) by structlog/stdlib level name.
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3}
PRIORITY_CRITICAL = 2
# Keys with a fixed journal field name; every other key is upper-cased.
_NAMED = {"node_id": "NODE_ID", "job_id": "JOB_ID", "event": "EVENT", "error_code": "ERROR_CODE"}
# Fields journald or its clients give a meaning of their own: our keys of these
# names get an AITBC_ prefix instead of overriding them.
_RESERVED = frozenset(
    {
        "MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC", "ERRNO",
        "INVOCATION_ID", "USER_INVOCATION_ID", "SYSLOG_FACILITY", "SYSLOG_IDENTIFIER",
        "SYSLOG_PID", "SYSLOG_TIMESTAMP", "SYSLOG_RAW", "TID", "UNIT", "USER_UNIT",
        "DOCUMENTATION", "COREDUMP_UNIT", "OBJECT_PID",
    }
)  # fmt: skip
_BAD_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")


def journald_wanted(environ: Mapping[str, str], fds: tuple[int, ...] = (1, 2)) -> bool:
    """Running under systemd and systemd-python importable?

    Under systemd means: $JOURNAL_STREAM names (device:inode) our stdout or
    stderr, or, without $JOURNAL_STREAM, $INVOCATION_ID is set. Both variables
    are inherited by every child of a service (a CI runner's test processes,
    with stdout redirected to a file): the device:inode check keeps those on
    stdout, as systemd.exec(5) advises.
    """
    stream = environ.get("JOURNAL_STREAM", "")
    if stream:
        if not _stream_is_ours(stream, fds):
            return False
    elif not environ.get("INVOCATION_ID"):
        return False
    try:
        from systemd import journal  # noqa: F401
    except ImportError:
        return False
    return True


def _stream_is_ours(journal_stream: str, fds: tuple[int, ...]) -> bool:
    try:
        dev, ino = (int(part) for part in journal_stream.split(":"))
    except ValueError:
        return False
    for fd in fds:
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (dev, ino):
            return True
    return False


def field_name(key: str) -> str:
    """A journal field name for `key`: [A-Z0-9_], not starting with _ or a digit, <= 64."""
    name = _BAD_FIELD_CHARS.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "F_" + name
    if name in _RESERVED:
        name = "AITBC_" + name
    return name[:64]


def journal_fields(event: Mapping[str, Any], message: str) -> dict[str, str]:
    """Map one rendered log record to journal fields (pure; the journald sink sends them).

    MESSAGE is the rendered line, PRIORITY comes from `level`, node_id/job_id/
    event/error_code become NODE_ID/JOB_ID/EVENT/ERROR_CODE, every other key is
    upper-cased; values that are not strings are JSON. None values are left out.
    """
    level = str(event.get("level", "info")).lower()
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(PRIORITY.get(level, PRIORITY_CRITICAL)),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
    }
    for key, value in event.items():
        if value is None:
            continue
        name = _NAMED.get(key) or field_name(key)
        if name in fields:  # two keys that differ only in case/punctuation: keep the first
            continue
        fields[name] = value if isinstance(value, str) else _json.dumps(value, default=str)
    return fields


class JournaldHandler(logging.Handler):
    """Send each record to journald with structured fields (systemd-python's sendv)."""

    def __init__(self, *, json_message: bool = True) -> None:
        super().__init__()
        from systemd import journal

        self._sendv = journal.sendv
        self._json_message = json_message

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)  # the JSON line (the formatter always renders JSON)
            try:
                event = _json.loads(line)
            except ValueError:
                event = {"event": line, "level": record.levelname.lower()}
            message = line if self._json_message else _plain(event)
            fields = journal_fields(event, message)
            self._sendv(*(f"{k}={v}" for k, v in fields.items()))
        except Exception:
            self.handleError(record)


def _plain(event: Mapping[str, Any]) -> str:
    rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("ts", "level", "event"))
    return f"{event.get('event', '')} {rest}".rstrip()


def configure(
    level: str = "info",
    *,
    json: bool = True,
    path: str = "",
    stream: Any = None,
    journald: bool = False,
) -> None:
    """Configure structlog + stdlib logging once for the whole process.

    journald=True replaces the stdout sink with the journald sink (under
    systemd stdout would reach the journal too, as a second, field-less copy).
    """
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        structlog.processors.format_exc_info,
        _redact,
        _order,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer(default=str)
        if json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=shared,
    )
    file_formatter = structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(default=str),
        ],
        foreign_pre_chain=shared,
    )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if journald:
        sink: logging.Handler = JournaldHandler(json_message=json)
        sink.setFormatter(file_formatter)  # always JSON: the handler parses it into fields
    else:
        sink = logging.StreamHandler(stream or sys.stdout)
        sink.setFormatter(formatter)
    root.addHandler(sink)
    if path:
        file_handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
        file_handler.setFormatter(file_formatter)
        root.addHandler(file_handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric)
    # Third-party chatter (httpx logs every request at INFO) stays out of our stream.
    for noisy in ("httpx", "httpcore", "hypercorn.access", "hypercorn.error"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str = "aitbc_miner") -> Any:
    return structlog.get_logger(name)
