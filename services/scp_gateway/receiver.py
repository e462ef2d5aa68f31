"""What the gateway does with one C-STORE, mapped to a DIMSE status.

Statuses, and why:
- 0x0000 Success: only after JetStream acknowledged the publish; the instance is safe.
- 0xA700 Out of resources: NATS unreachable, stream full or too slow. The modality keeps
  the image and retries later; we must never claim Success for it.
- 0xA900 Data set does not match SOP class: the identity we need (SOP Instance UID
  equal to the request's, Study and Series UIDs) is missing or wrong.
- 0xC210 Cannot understand: the dataset cannot be parsed at all.
- 0xC211 Cannot understand (too large): the dataset exceeds ``scp.max_dataset_bytes``
  (the spool stops writing it once it passes the limit; see ``spool``).
  Not 0xA700: "out of resources" tells the modality to retry later, and resending the
  same oversized object can never succeed. A Cxxx failure is permanent for the sender;
  0xC211 (not 0xC210) lets logs and the sender's operator tell "too large" apart from
  "unparseable". It is counted in the ``cannot_understand`` status class.
- Anything the pipeline would dead-letter as a contract violation (a UID, AE title or
  transfer syntax the message contract refuses) is refused here with 0xA900, so the
  gateway never answers Success for an instance the encryptor would not take.

Each C-STORE is counted by status class and calling-AE class (allowed or any, never
the AE title) and timed, and starts the trace that follows the instance through every
stage (its context travels in the ``traceparent`` header).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from dicomflow.scp_gateway import metrics as scp_metrics
from dicomflow.scp_gateway.admission import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH,
    OUT_OF_RESOURCES,
    SUCCESS,
    TOO_LARGE,
    Arrival,
    Rejected,
    admitted,
)
from dicomflow.scp_gateway.hop import HopTimeout, run_on_loop
from dicomflow.scp_gateway.settings import ScpSettings
from dicomflow.scp_gateway.spool import Received
from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.errors import BrokerUnavailable
from dicomflow.shared.nats.transport import Transport
from dicomflow.shared.telemetry.bundle import Telemetry
from opentelemetry.trace import SpanKind, StatusCode

log = logging.getLogger(__name__)

DEFAULT_MAX_DATASET_BYTES: int = ScpSettings.model_fields["max_dataset_bytes"].default

STATUS_CLASSES = {
    SUCCESS: "success",
    OUT_OF_RESOURCES: "out_of_resources",
    DOES_NOT_MATCH: "does_not_match",
    CANNOT_UNDERSTAND: "cannot_understand",
    TOO_LARGE: "cannot_understand",
}


def _file_received(path: Path) -> Received:
    return Received(path.stat().st_size)


def _open_body(path: Path, received: Received, inline_limit: int) -> BinaryIO:
    """The received Part-10 file: from memory when the spool kept it there; read into
    memory at once when it travels inline (it is at most ``max_payload`` and is published
    from memory anyway), so identity, digest and publish share one read; otherwise the
    open file, streamed by each."""
    if received.data is not None:
        return io.BytesIO(received.data)
    if received.size <= inline_limit:
        return io.BytesIO(path.read_bytes())
    return path.open("rb")


class Receiver:
    """Bridges pynetdicom's association threads to the asyncio loop that owns NATS."""

    def __init__(
        self,
        transport: Transport,
        loop: asyncio.AbstractEventLoop,
        publish_timeout: float,
        telemetry: Telemetry,
        allowed_calling_aes: frozenset[str] | None,
        max_dataset_bytes: int = DEFAULT_MAX_DATASET_BYTES,
        received_of: Callable[[Path], Received] = _file_received,
    ) -> None:
        """``allowed_calling_aes`` None: any calling AE is accepted. ``received_of``:
        what arrived for a spooled dataset (the spool's count, which goes on past a file
        it stopped writing at the limit; the dataset itself if it kept it in memory; its
        SHA-256 if it hashed it as it came)."""
        self._max_dataset_bytes = max_dataset_bytes
        self._received_of = received_of
        self._transport = transport
        self._loop = loop
        self._timeout = publish_timeout
        self._metrics = scp_metrics.of(telemetry.metrics)
        self._tracing = telemetry.tracing
        self._allowed = allowed_calling_aes
        self._metrics.at_zero(accept_any=allowed_calling_aes is None)

    def _calling_class(self, calling: str) -> str:
        if self._allowed is None:
            return "any"
        return "allowed" if calling in self._allowed else "not_allowed"

    def on_accepted(self, event: Any) -> None:
        self._count_association(event, "accepted")

    def on_rejected(self, event: Any) -> None:
        self._count_association(event, "rejected")

    def on_aborted(self, event: Any) -> None:
        self._count_association(event, "aborted")

    def _count_association(self, event: Any, result: str) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        self._metrics.scp_associations.labels(result, self._calling_class(calling)).inc()

    def on_echo(self, event: Any) -> int:
        return SUCCESS

    def on_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        called = str(event.assoc.acceptor.ae_title).strip()
        start = time.perf_counter()
        with self._tracing.span(
            "C-STORE", kind=SpanKind.SERVER, attributes={"dicomflow.stage": "scp-gateway"}
        ) as span:
            status, size = self._store(event, calling, called)
            span.set_attribute("dicom.status", f"0x{status:04X}")
            if status != SUCCESS:
                span.set_status(StatusCode.ERROR)
        label = STATUS_CLASSES.get(status, "out_of_resources")
        self._metrics.cstore.labels(label, self._calling_class(calling)).inc()
        self._metrics.cstore_seconds.labels(label).observe(time.perf_counter() - start)
        if status == SUCCESS:
            self._metrics.cstore_bytes.inc(size)
        return status

    def _store(self, event: Any, calling: str, called: str) -> tuple[int, int]:
        """The status to answer, and the dataset's size."""
        size = 0
        try:
            request = event.request
            # pynetdicom spooled the dataset as a Part-10 file as it arrived (chunked
            # receive): in memory if it travels inline, else in a file, never held whole
            # in memory here or later.
            path = Path(event.dataset_path)
            # Before anything reads it: the Part-10 file as it would be published.
            received = self._received_of(path)
            arrival = Arrival(
                calling_ae=calling,
                called_ae=called,
                sop_class_uid=str(request.AffectedSOPClassUID),
                transfer_syntax=str(event.context.transfer_syntax),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
                traceparent=self._tracing.traceparent(),
            )
            with admitted(
                received.size,
                lambda: _open_body(path, received, self._transport.inline_limit),
                arrival,
                self._max_dataset_bytes,
                sha256=received.sha256,
            ) as (instance, fp):
                size = instance.size
                self._publish(instance, fp, size)
        except Rejected as exc:
            log.warning("C-STORE from %s refused with 0x%04X: %s", calling, exc.status, exc)
            return exc.status, size
        except BrokerUnavailable as exc:
            log.error("C-STORE from %s answered 0xA700: %s", calling, exc)
            return OUT_OF_RESOURCES, size
        except FileNotFoundError:
            # The spool removed the file: its association ended before it was read.
            log.warning("C-STORE from %s dropped: its association ended first", calling)
            return OUT_OF_RESOURCES, size
        except Exception:
            # Anything unforeseen: the instance is not safe, so never Success.
            log.exception("C-STORE from %s failed unexpectedly; answered 0xA700", calling)
            return OUT_OF_RESOURCES, size
        return SUCCESS, size

    def _publish(self, instance: Instance, body: BinaryIO, size: int) -> None:
        coro = self._transport.publish(
            subjects.ingest_subject(instance.called_ae, instance.calling_ae),
            instance,
            body,
            size,
            blob_prefix=messages.INGEST_BLOB_PREFIX,
        )
        try:
            run_on_loop(self._loop, coro, self._timeout * 3)
        except HopTimeout as exc:
            raise BrokerUnavailable("publish did not complete in time") from exc
