"""The job lifecycle as data: phases, events, the transition table, recovery.

Pure: no I/O, no clock. `advance()` is the only way a job changes phase; an
illegal move raises `IllegalTransition` instead of silently corrupting state.

    IDLE → PULLING → ACKED → PREP → RUNNING → UPLOADING → DONE
                              ↘       ↘          ↘
                               FAILED (non-retryable) | RETRY_WAIT (retryable)
    any live phase → ABANDONED   (lease lost: 404/409/410, nothing to report)

DONE, FAILED and RETRY_WAIT carry a final report (result or fail) that is
"confirmed" once the coordinator accepted it; RETRY_WAIT means "handed back
to the coordinator to be retried", not "the miner will retry it".
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final


class Phase(StrEnum):
    IDLE = "IDLE"
    PULLING = "PULLING"
    ACKED = "ACKED"
    PREP = "PREP"
    RUNNING = "RUNNING"
    UPLOADING = "UPLOADING"
    DONE = "DONE"
    FAILED = "FAILED"
    RETRY_WAIT = "RETRY_WAIT"
    ABANDONED = "ABANDONED"


class Event(StrEnum):
    PULL_STARTED = "pull_started"
    NO_JOB = "no_job"
    ACKED = "acked"
    ACK_REFUSED = "ack_refused"  # 409 on ack: the lease was gone before we started
    ACCEPTED = "accepted"  # manifest, signature and allowlist checks passed
    PREPARED = "prepared"  # inputs materialised, process about to start
    EXITED_OK = "exited_ok"
    UPLOADED = "uploaded"  # every artifact is at the coordinator (or none needed)
    FAILED = "failed"  # non-retryable failure decided
    FAILED_RETRYABLE = "failed_retryable"
    LEASE_LOST = "lease_lost"


TERMINAL: Final = frozenset({Phase.DONE, Phase.FAILED, Phase.RETRY_WAIT, Phase.ABANDONED})
REPORTING: Final = frozenset({Phase.DONE, Phase.FAILED, Phase.RETRY_WAIT})
LIVE: Final = frozenset({Phase.ACKED, Phase.PREP, Phase.RUNNING, Phase.UPLOADING})


def _failures(phase: Phase) -> dict[tuple[Phase, Event], Phase]:
    return {
        (phase, Event.FAILED): Phase.FAILED,
        (phase, Event.FAILED_RETRYABLE): Phase.RETRY_WAIT,
        (phase, Event.LEASE_LOST): Phase.ABANDONED,
    }


_NEXT: Final[Mapping[tuple[Phase, Event], Phase]] = {
    (Phase.IDLE, Event.PULL_STARTED): Phase.PULLING,
    (Phase.PULLING, Event.NO_JOB): Phase.IDLE,
    (Phase.PULLING, Event.ACKED): Phase.ACKED,
    (Phase.PULLING, Event.ACK_REFUSED): Phase.ABANDONED,
    (Phase.ACKED, Event.ACCEPTED): Phase.PREP,
    (Phase.PREP, Event.PREPARED): Phase.RUNNING,
    (Phase.RUNNING, Event.EXITED_OK): Phase.UPLOADING,
    (Phase.UPLOADING, Event.UPLOADED): Phase.DONE,
    **_failures(Phase.ACKED),
    **_failures(Phase.PREP),
    **_failures(Phase.RUNNING),
    **_failures(Phase.UPLOADING),
}


class IllegalTransition(Exception):
    def __init__(self, phase: Phase, event: Event) -> None:
        super().__init__(f"no transition from {phase} on {event}")
        self.phase = phase
        self.event = event


def advance(phase: Phase, event: Event) -> Phase:
    """The phase after `event` happens in `phase`; raises IllegalTransition."""
    try:
        return _NEXT[phase, event]
    except KeyError:
        raise IllegalTransition(phase, event) from None


def legal_transitions() -> Mapping[tuple[Phase, Event], Phase]:
    """The whole table (read-only), for tests and documentation."""
    return _NEXT


def failure_event(retryable: bool) -> Event:
    return Event.FAILED_RETRYABLE if retryable else Event.FAILED


class Recovery(StrEnum):
    """What start-up recovery does with a job found in the workspace."""

    KILL_AND_REPORT_CRASH = "kill_and_report_crash"  # ACKED/PREP/RUNNING at crash → E_CRASH
    RESUME_UPLOAD = "resume_upload"  # UPLOADING → finish the upload, then result
    RESEND_FINAL = "resend_final"  # final report not confirmed → same key again
    LEAVE = "leave"  # confirmed or abandoned → sweeper's business


def recovery_action(phase: Phase, confirmed: bool) -> Recovery:
    if phase in (Phase.ACKED, Phase.PREP, Phase.RUNNING):
        return Recovery.KILL_AND_REPORT_CRASH
    if phase is Phase.UPLOADING:
        return Recovery.RESUME_UPLOAD
    if phase in REPORTING and not confirmed:
        return Recovery.RESEND_FINAL
    return Recovery.LEAVE
