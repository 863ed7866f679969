"""journald field mapping (pure) and the choice of sink, without a journald."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import structlog

from aitbc_miner import logs


def test_named_fields_priority_and_message() -> None:
    event = {
        "ts": "2025-01-01T00:00:00Z",
        "level": "error",
        "node_id": "node-1",
        "job_id": "j-42",
        "event": "job_finished",
        "error_code": "E_TIMEOUT",
        "duration_s": 1.5,
        "usage": {"cpu_s": 0.1},
        "retryable": False,
    }
    line = json.dumps(event)
    fields = logs.journal_fields(event, line)
    assert fields["MESSAGE"] == line
    assert fields["PRIORITY"] == "3"
    assert fields["SYSLOG_IDENTIFIER"] == "aitbc-miner"
    assert fields["NODE_ID"] == "node-1"
    assert fields["JOB_ID"] == "j-42"
    assert fields["EVENT"] == "job_finished"
    assert fields["ERROR_CODE"] == "E_TIMEOUT"
    assert fields["DURATION_S"] == "1.5"
    assert json.loads(fields["USAGE"]) == {"cpu_s": 0.1}
    assert fields["RETRYABLE"] == "false"
    assert fields["TS"] == "2025-01-01T00:00:00Z"
    assert all(isinstance(v, str) for v in fields.values())


@pytest.mark.parametrize(
    ("level", "priority"),
    [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")],
)
def test_priority_from_level(level: str, priority: str) -> None:
    assert logs.journal_fields({"level": level, "event": "x"}, "x")["PRIORITY"] == priority


def test_none_values_left_out_and_reserved_names_prefixed() -> None:
    fields = logs.journal_fields(
        {"event": "e", "job_id": None, "message": "hi", "priority": 1, "code_file": "f"}, "m"
    )
    assert "JOB_ID" not in fields
    assert fields["MESSAGE"] == "m"  # our own key does not override the entry's message
    assert fields["AITBC_MESSAGE"] == "hi"
    assert fields["AITBC_PRIORITY"] == "1"
    assert fields["AITBC_CODE_FILE"] == "f"


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("retry_in_s", "RETRY_IN_S"),
        ("gpu.uuid", "GPU_UUID"),
        ("_private", "PRIVATE"),
        ("9lives", "F_9LIVES"),
        ("x" * 80, "X" * 64),
    ],
)
def test_field_names_are_valid_journal_names(key: str, name: str) -> None:
    assert logs.field_name(key) == name


def test_journald_wanted_only_under_systemd(tmp_path: Path) -> None:
    pytest.importorskip("systemd.journal")
    assert not logs.journald_wanted({})
    assert logs.journald_wanted({"INVOCATION_ID": "abc"})
    with open(tmp_path / "out", "w") as fh:
        st = os.fstat(fh.fileno())
        ours = f"{st.st_dev}:{st.st_ino}"
        assert logs.journald_wanted({"JOURNAL_STREAM": ours}, fds=(fh.fileno(),))
        # inherited from a parent service, our stdout is somewhere else: stay on stdout
        assert not logs.journald_wanted(
            {"JOURNAL_STREAM": "1:2", "INVOCATION_ID": "abc"}, fds=(fh.fileno(),)
        )
        assert not logs.journald_wanted({"JOURNAL_STREAM": "junk"}, fds=(fh.fileno(),))


def test_journald_handler_sends_mapped_fields_with_secrets_masked() -> None:
    pytest.importorskip("systemd.journal")
    sent: list[tuple[str, ...]] = []
    logs.configure("info", journald=True)
    try:
        root = logging.getLogger()
        (handler,) = [h for h in root.handlers if isinstance(h, logs.JournaldHandler)]
        handler._sendv = lambda *args: sent.append(args)  # record instead of sending
        logs.register_secret("s3cret-token")
        structlog.get_logger("t").warning(
            "heartbeat_failed", job_id="j-1", error="401 for s3cret-token"
        )
    finally:
        logs.configure("info")
    assert len(sent) == 1
    fields = dict(item.split("=", 1) for item in sent[0])
    assert fields["EVENT"] == "heartbeat_failed"
    assert fields["JOB_ID"] == "j-1"
    assert fields["PRIORITY"] == "4"
    assert "s3cret-token" not in sent[0][0] + "".join(sent[0])
    assert json.loads(fields["MESSAGE"])["event"] == "heartbeat_failed"
