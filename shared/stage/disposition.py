"""The one place where the outcome of handling a message becomes ack, nak or dead-letter.

The error's type alone decides (``kind``; the hierarchy is in ``dicomflow.shared.errors``):

- success: ack.
- ``PermanentError`` (``EnvelopeError`` among them): retrying cannot help; dead-letter
  at once.
- ``Outage`` (``BrokerUnavailable``, ``StorageUnavailable``): NATS or storage is away;
  the consumer first tries again in place for ``consumer.outage_grace`` seconds, then
  treats it as transient.
- ``TransientError``: nak with exponential backoff (with jitter), and dead-letter on the
  last allowed delivery so that nothing silently stops at MaxDeliver.
- anything else is a bug or an unforeseen failure: treated as transient (it may be a
  passing fault), so it is retried with backoff and dead-lettered when exhausted.
  Library errors of NATS and storage never arrive here raw: the edges' tables map them
  (``shared.nats.errormap``, ``shared.storage.errormap``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import Enum

from dicomflow.shared.errors import Outage, PermanentError
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.telemetry.redact import redact


class Action(Enum):
    ACK = "ack"
    NAK = "nak"
    DEAD_LETTER = "dead_letter"


class Kind(Enum):
    """What an error says about the message, by its type alone."""

    PERMANENT = "permanent"  # dead-letter at once
    OUTAGE = "outage"  # ride out in place, then as transient
    TRANSIENT = "transient"  # nak with backoff; dead-letter when deliveries are spent


def kind(exc: BaseException) -> Kind:
    if isinstance(exc, PermanentError):
        return Kind.PERMANENT
    if isinstance(exc, Outage):
        return Kind.OUTAGE
    return Kind.TRANSIENT


@dataclass(frozen=True, slots=True)
class Disposition:
    action: Action
    delay: float = 0.0
    reason: str = ""


ACK = Disposition(Action.ACK)


def decide(exc: BaseException | None, delivered: int, consumer: ConsumerSettings) -> Disposition:
    if exc is None:
        return ACK
    reason = redact(f"{type(exc).__name__}: {exc}")  # reasons rest in the DLQ: no UIDs
    if kind(exc) is Kind.PERMANENT:
        return Disposition(Action.DEAD_LETTER, reason=reason)
    if delivered >= consumer.max_deliver:
        return Disposition(
            Action.DEAD_LETTER, reason=f"gave up after {delivered} deliveries: {reason}"
        )
    return Disposition(Action.NAK, delay=backoff(delivered, consumer), reason=reason)


def backoff(delivered: int, consumer: ConsumerSettings) -> float:
    """Full-jitter exponential backoff: uniform in [base/2, base], base doubling per try."""
    base: float = min(consumer.backoff_initial * 2 ** max(delivered - 1, 0), consumer.backoff_max)
    jitter: float = random.random()  # noqa: S311 (jitter, not cryptography)
    return base / 2 + jitter * base / 2
