"""What a DIMSE status or an association outcome means for a delivery.

- Delivered: Success 0x0000 and the warnings 0x0001, 0xB000 (coercion), 0xB006
  (elements discarded), 0xB007 (data set does not match SOP class), any 0xBxxx: the
  peer stored the instance.
- Transient, retried with backoff: no answer at all (connection refused or dropped,
  timeouts, an aborted association) and an association "rejected-transient", which
  also hold the destination until a C-ECHO gets through (``health``); and the
  statuses 0xA7xx (out of resources), 0x0213 (resource limitation), 0x0210 (duplicate
  invocation) and 0xFE00 (cancelled): the same request may succeed later.
- Permanent, dead-lettered with the status: an association "rejected-permanent" (an AE
  title the peer does not know), no accepted presentation context for the instance's
  SOP class and transfer syntax, and every other failure status, among them 0xA9xx
  (data set does not match SOP class), 0xCxxx (cannot understand), 0x0122 (SOP class
  not supported), 0x0124 (not authorised), 0x0111 (duplicate SOP instance).
"""

from __future__ import annotations

from enum import Enum

from dicomflow.shared.contracts.deadletters import status_header
from dicomflow.shared.errors import PermanentError, TransientError

SUCCESS = 0x0000
TRANSIENT_STATUSES = frozenset({0x0210, 0x0213, 0xFE00})


class Outcome(Enum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


def classify(status: int) -> Outcome:
    if status == SUCCESS or status == 0x0001 or 0xB000 <= status <= 0xBFFF:
        return Outcome.DELIVERED
    if 0xA700 <= status <= 0xA7FF or status in TRANSIENT_STATUSES:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


class DeliveryDeferred(TransientError):
    """The destination could not take the instance now; it is retried with backoff."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(_with_status(reason, status))
        self.status = status

    def dead_letter_headers(self) -> dict[str, str]:
        return status_header(self.status)


class DestinationUnreachable(DeliveryDeferred):
    """The peer did not answer at the DICOM level (no connection, no association, no
    response): retried like any deferral, and its destination is held (``health``)."""


class DeliveryRefused(PermanentError):
    """The destination refused the instance for good; it is dead-lettered with the status."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(_with_status(reason, status))
        self.status = status

    def dead_letter_headers(self) -> dict[str, str]:
        return status_header(self.status)


def _with_status(reason: str, status: int | None) -> str:
    return reason if status is None else f"status 0x{status:04X}: {reason}"


def error_for(status: int, destination: str) -> DeliveryDeferred | DeliveryRefused | None:
    """None when delivered; otherwise the error that settles the message."""
    outcome = classify(status)
    if outcome is Outcome.DELIVERED:
        return None
    reason = f"{destination} answered the C-STORE with a failure status"
    if outcome is Outcome.TRANSIENT:
        return DeliveryDeferred(reason, status)
    return DeliveryRefused(reason, status)
