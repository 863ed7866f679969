"""Logging set-up: structlog JSON lines, configured once at start.

Every line carries `ts, level, node_id, job_id, event` first. Output goes to
stdout (or journald, see systemd integration) and optionally to a JSONL file
that logrotate may rotate under us (WatchedFileHandler reopens it). Secret
values registered with `register_secret` are masked in every field, as a
second line of defence behind never logging them in the first place.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import MutableMapping
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


def configure(
    level: str = "info", *, json: bool = True, path: str = "", stream: Any = None
) -> None:
    """Configure structlog + stdlib logging once for the whole process."""
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
    console = logging.StreamHandler(stream or sys.stdout)
    console.setFormatter(formatter)
    root.addHandler(console)
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
