"""The job lifecycle table, tested exhaustively without I/O (STYLE rule 2)."""

from __future__ import annotations

import itertools

import pytest

from aitbc_miner.lifecycle import (
    LIVE,
    REPORTING,
    TERMINAL,
    Event,
    IllegalTransition,
    Phase,
    Recovery,
    advance,
    failure_event,
    legal_transitions,
    recovery_action,
)

P, E = Phase, Event

# Written out by hand from the module docstring / PROTOCOL.md, deliberately not
# derived from legal_transitions(): a change to the table must change this too.
EXPECTED: dict[tuple[Phase, Event], Phase] = {
    (P.IDLE, E.PULL_STARTED): P.PULLING,
    (P.PULLING, E.NO_JOB): P.IDLE,
    (P.PULLING, E.ACKED): P.ACKED,
    (P.PULLING, E.ACK_REFUSED): P.ABANDONED,
    (P.ACKED, E.ACCEPTED): P.PREP,
    (P.ACKED, E.FAILED): P.FAILED,
    (P.ACKED, E.FAILED_RETRYABLE): P.RETRY_WAIT,
    (P.ACKED, E.LEASE_LOST): P.ABANDONED,
    (P.PREP, E.PREPARED): P.RUNNING,
    (P.PREP, E.FAILED): P.FAILED,
    (P.PREP, E.FAILED_RETRYABLE): P.RETRY_WAIT,
    (P.PREP, E.LEASE_LOST): P.ABANDONED,
    (P.RUNNING, E.EXITED_OK): P.UPLOADING,
    (P.RUNNING, E.FAILED): P.FAILED,
    (P.RUNNING, E.FAILED_RETRYABLE): P.RETRY_WAIT,
    (P.RUNNING, E.LEASE_LOST): P.ABANDONED,
    (P.UPLOADING, E.UPLOADED): P.DONE,
    (P.UPLOADING, E.FAILED): P.FAILED,
    (P.UPLOADING, E.FAILED_RETRYABLE): P.RETRY_WAIT,
    (P.UPLOADING, E.LEASE_LOST): P.ABANDONED,
}

ALL_PAIRS = list(itertools.product(Phase, Event))


def test_enums_are_the_documented_sets() -> None:
    # Guards the exhaustive product below: a new phase or event must be added here too.
    assert {p.value for p in Phase} == {
        "IDLE", "PULLING", "ACKED", "PREP", "RUNNING", "UPLOADING",
        "DONE", "FAILED", "RETRY_WAIT", "ABANDONED",
    }  # fmt: skip
    assert len(Event) == 11
    assert len(ALL_PAIRS) == 110


@pytest.mark.parametrize(("phase", "event"), ALL_PAIRS, ids=lambda v: str(v))
def test_every_pair(phase: Phase, event: Event) -> None:
    if (phase, event) in EXPECTED:
        assert advance(phase, event) is EXPECTED[phase, event]
    else:
        with pytest.raises(IllegalTransition) as info:
            advance(phase, event)
        assert info.value.phase is phase
        assert info.value.event is event
        assert str(phase) in str(info.value) and str(event) in str(info.value)


def test_table_matches_expected_exactly() -> None:
    assert dict(legal_transitions()) == EXPECTED


@pytest.mark.parametrize("phase", sorted(TERMINAL))
def test_terminal_phases_have_no_outgoing_transitions(phase: Phase) -> None:
    for event in Event:
        with pytest.raises(IllegalTransition):
            advance(phase, event)


def test_phase_sets() -> None:
    assert frozenset({P.DONE, P.FAILED, P.RETRY_WAIT, P.ABANDONED}) == TERMINAL
    assert frozenset({P.DONE, P.FAILED, P.RETRY_WAIT}) == REPORTING
    assert frozenset({P.ACKED, P.PREP, P.RUNNING, P.UPLOADING}) == LIVE


def _walk(start: Phase, events: list[Event]) -> list[Phase]:
    phases = [start]
    for event in events:
        phases.append(advance(phases[-1], event))
    return phases


def test_happy_path_to_done() -> None:
    events = [E.PULL_STARTED, E.ACKED, E.ACCEPTED, E.PREPARED, E.EXITED_OK, E.UPLOADED]
    assert _walk(P.IDLE, events) == [
        P.IDLE, P.PULLING, P.ACKED, P.PREP, P.RUNNING, P.UPLOADING, P.DONE,
    ]  # fmt: skip


def test_empty_pulls_loop_back_to_idle_then_succeed() -> None:
    events = [E.PULL_STARTED, E.NO_JOB] * 3 + [
        E.PULL_STARTED, E.ACKED, E.ACCEPTED, E.PREPARED, E.EXITED_OK, E.UPLOADED,
    ]  # fmt: skip
    assert _walk(P.IDLE, events)[-1] is P.DONE


def test_ack_refused_abandons_before_running() -> None:
    assert _walk(P.IDLE, [E.PULL_STARTED, E.ACK_REFUSED])[-1] is P.ABANDONED


def _path_to(phase: Phase) -> list[Event]:
    steps = [E.PULL_STARTED, E.ACKED, E.ACCEPTED, E.PREPARED, E.EXITED_OK]
    order = [P.PULLING, P.ACKED, P.PREP, P.RUNNING, P.UPLOADING]
    return steps[: order.index(phase) + 1]


@pytest.mark.parametrize("phase", [P.ACKED, P.PREP, P.RUNNING, P.UPLOADING])
def test_every_live_phase_is_reachable_and_can_fail_or_lose_its_lease(phase: Phase) -> None:
    assert _walk(P.IDLE, _path_to(phase))[-1] is phase
    assert advance(phase, failure_event(retryable=True)) is P.RETRY_WAIT
    assert advance(phase, failure_event(retryable=False)) is P.FAILED
    assert advance(phase, E.LEASE_LOST) is P.ABANDONED


@pytest.mark.parametrize("phase", [P.IDLE, P.PULLING])
def test_non_live_phases_cannot_fail_or_lose_a_lease(phase: Phase) -> None:
    for event in (E.FAILED, E.FAILED_RETRYABLE, E.LEASE_LOST):
        with pytest.raises(IllegalTransition):
            advance(phase, event)


def test_failure_event() -> None:
    assert failure_event(True) is E.FAILED_RETRYABLE
    assert failure_event(False) is E.FAILED


RECOVERY: dict[tuple[Phase, bool], Recovery] = {
    (P.IDLE, False): Recovery.LEAVE,
    (P.IDLE, True): Recovery.LEAVE,
    (P.PULLING, False): Recovery.LEAVE,
    (P.PULLING, True): Recovery.LEAVE,
    (P.ACKED, False): Recovery.KILL_AND_REPORT_CRASH,
    (P.ACKED, True): Recovery.KILL_AND_REPORT_CRASH,
    (P.PREP, False): Recovery.KILL_AND_REPORT_CRASH,
    (P.PREP, True): Recovery.KILL_AND_REPORT_CRASH,
    (P.RUNNING, False): Recovery.KILL_AND_REPORT_CRASH,
    (P.RUNNING, True): Recovery.KILL_AND_REPORT_CRASH,
    (P.UPLOADING, False): Recovery.RESUME_UPLOAD,
    (P.UPLOADING, True): Recovery.RESUME_UPLOAD,
    (P.DONE, False): Recovery.RESEND_FINAL,
    (P.DONE, True): Recovery.LEAVE,
    (P.FAILED, False): Recovery.RESEND_FINAL,
    (P.FAILED, True): Recovery.LEAVE,
    (P.RETRY_WAIT, False): Recovery.RESEND_FINAL,
    (P.RETRY_WAIT, True): Recovery.LEAVE,
    (P.ABANDONED, False): Recovery.LEAVE,
    (P.ABANDONED, True): Recovery.LEAVE,
}


@pytest.mark.parametrize(
    ("phase", "confirmed"), list(itertools.product(Phase, (False, True))), ids=str
)
def test_recovery_action(phase: Phase, confirmed: bool) -> None:
    assert recovery_action(phase, confirmed) is RECOVERY[phase, confirmed]


def test_recovery_table_covers_every_phase() -> None:
    assert set(RECOVERY) == set(itertools.product(Phase, (False, True)))
