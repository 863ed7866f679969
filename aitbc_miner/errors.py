"""Stable job error codes and the daemon's small exception tree.

Pure: no I/O. Error codes are wire strings (PROTOCOL.md "Error codes"); a
failed job is an *outcome* carrying one of them, never an exception that
escapes the agent loop.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Job failure codes as sent in `POST /jobs/fail`."""

    INVALID = "E_INVALID"
    SIGNATURE = "E_SIGNATURE"
    DENY = "E_DENY"
    INPUT = "E_INPUT"
    NOGPU = "E_NOGPU"
    OOM = "E_OOM"
    TIMEOUT = "E_TIMEOUT"
    EXIT = "E_EXIT"
    OUTPUT = "E_OUTPUT"
    DISK = "E_DISK"
    CANCELLED = "E_CANCELLED"
    CRASH = "E_CRASH"

    @property
    def retryable(self) -> bool:
        """Whether the coordinator may hand the job out again (possibly elsewhere)."""
        return self in _RETRYABLE


_RETRYABLE = frozenset(
    {ErrorCode.INPUT, ErrorCode.NOGPU, ErrorCode.DISK, ErrorCode.CANCELLED, ErrorCode.CRASH}
)


class MinerError(Exception):
    """Base of every error the daemon raises on purpose."""


class JobFailure(MinerError):
    """A job cannot go on; carries the code reported to the coordinator."""

    def __init__(self, code: ErrorCode, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = code.retryable if retryable is None else retryable

    def __repr__(self) -> str:
        return f"JobFailure({self.code.value}, {self.message!r})"


class CoordinatorError(MinerError):
    """A coordinator call failed in a way the caller must handle."""


class NodeRejected(CoordinatorError):
    """403: the coordinator rejected or disabled this node."""


class JobGone(CoordinatorError):
    """404/409/410 on a job endpoint: this node no longer owns the job."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class RequestRejected(CoordinatorError):
    """A non-retryable 4xx the contract gives no special meaning (e.g. 400, 422)."""

    def __init__(self, message: str, *, status: int, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class CoordinatorUnavailable(CoordinatorError):
    """A retryable failure (transport error, 5xx, 429, malformed reply) of a
    call made without retries; the caller owns the backoff."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
