"""The dead-letter contract: the headers a stage adds to a message it dead-letters.

A dead letter on ``dicomflow.dlq.<stage>`` keeps the message's own headers (the stream's
contract, ``messages``) and adds the ``Dicomflow-Dlq-*`` set below; nothing else
writes, reads or strips a dead-letter header under another name. ``dlq replay``
republishes a letter without any of them (``without_dlq_headers``): a replayed message
is an ordinary message of its stream again. Values name no patient data: the reason
names the header or the error type that is off, never a UID.
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "Dicomflow-Dlq-"

H_DLQ_REASON = f"{PREFIX}Reason"  # why, at most 1000 characters
H_DLQ_STAGE = f"{PREFIX}Stage"  # the stage that dead-lettered it
H_DLQ_SUBJECT = f"{PREFIX}Subject"  # the subject it was consumed from
H_DLQ_DELIVERIES = f"{PREFIX}Deliveries"  # how many deliveries it had
H_DLQ_STREAM_SEQ = f"{PREFIX}Stream-Seq"  # its sequence in the stream it came from
# What a letter's body is, when a stage's ``letter`` hook changed it: "sealed" (the
# headers are then those of a signed SEALED message) or "dropped" (headers only; the
# reason says why). Absent: the body as received.
H_DLQ_BODY = f"{PREFIX}Body"
BODY_SEALED = "sealed"
BODY_DROPPED = "dropped"
# The DIMSE status a destination answered, on a refused delivery (``0xC000``).
H_DLQ_STATUS = f"{PREFIX}Status"

DLQ_HEADERS = (
    H_DLQ_REASON,
    H_DLQ_STAGE,
    H_DLQ_SUBJECT,
    H_DLQ_DELIVERIES,
    H_DLQ_STREAM_SEQ,
    H_DLQ_BODY,
    H_DLQ_STATUS,
)
"""Every dead-letter header dicomflow writes."""


def is_dlq_header(name: str) -> bool:
    """Whether ``name`` is a dead-letter header (any ``Dicomflow-Dlq-*``, of this
    version or another: a replayed message carries none)."""
    return name.lower().startswith(PREFIX.lower())


def without_dlq_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` without any dead-letter header: what a replayed message carries."""
    return {k: v for k, v in headers.items() if not is_dlq_header(k)}


def status_header(status: int | None) -> dict[str, str]:
    """The ``Dicomflow-Dlq-Status`` of a refused delivery ({} when there is no status)."""
    return {} if status is None else {H_DLQ_STATUS: f"0x{status:04X}"}
