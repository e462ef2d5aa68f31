"""Errors map to ack / nak-with-backoff / dead-letter in one place."""

from __future__ import annotations

import pytest
from dicomflow.shared.errors import (
    BrokerUnavailable,
    ContractViolation,
    DuplicateConflict,
    IntegrityError,
    StorageUnavailable,
    UnknownMasterKey,
)
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.stage.disposition import Action, backoff, decide

SETTINGS = ConsumerSettings(max_deliver=5, backoff_initial=1.0, backoff_max=8.0)


def test_success_acks() -> None:
    assert decide(None, 1, SETTINGS).action is Action.ACK


@pytest.mark.parametrize(
    "exc",
    [ContractViolation("x"), DuplicateConflict("x"), IntegrityError("x"), UnknownMasterKey(9)],
)
def test_permanent_errors_dead_letter_at_once(exc: Exception) -> None:
    outcome = decide(exc, 1, SETTINGS)
    assert outcome.action is Action.DEAD_LETTER
    assert type(exc).__name__ in outcome.reason


@pytest.mark.parametrize(
    "exc", [StorageUnavailable("s3 503"), BrokerUnavailable("down"), RuntimeError("unforeseen")]
)
def test_transient_and_unknown_errors_are_retried_then_dead_lettered(exc: Exception) -> None:
    for delivered in range(1, SETTINGS.max_deliver):
        outcome = decide(exc, delivered, SETTINGS)
        assert outcome.action is Action.NAK
        assert outcome.delay > 0
    last = decide(exc, SETTINGS.max_deliver, SETTINGS)
    assert last.action is Action.DEAD_LETTER
    assert f"gave up after {SETTINGS.max_deliver} deliveries" in last.reason


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    for delivered, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)]:
        for _ in range(50):
            delay = backoff(delivered, SETTINGS)
            assert base / 2 <= delay <= base
