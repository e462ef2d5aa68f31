"""What the gateway does with one C-STORE, mapped to a DIMSE status.

Statuses, and why:
- 0x0000 Success: only after JetStream acknowledged the publish; the instance is safe.
- 0xA700 Out of resources: NATS unreachable, stream full or too slow. The modality keeps
  the image and retries later; we must never claim Success for it.
- 0xA900 Data set does not match SOP class: the identity we need (SOP Instance UID
  equal to the request's, Study and Series UIDs) is missing or wrong.
- 0xC210 Cannot understand: the dataset cannot be parsed at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicomflow.shared import subjects
from dicomflow.shared.errors import BrokerUnavailable
from dicomflow.shared.messages import Instance
from dicomflow.shared.transport import Transport

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

_IDENTITY_TAGS = [
    "SOPInstanceUID",
    "SOPClassUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
]


class Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class Identity:
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str


def identify(part10: bytes, affected_sop_instance_uid: str) -> Identity:
    """Read the identity attributes, never the pixel data; raise Rejected if unusable."""
    try:
        ds = dcmread(io.BytesIO(part10), stop_before_pixels=True, specific_tags=_IDENTITY_TAGS)
        sop = str(ds.get("SOPInstanceUID", ""))
        study = str(ds.get("StudyInstanceUID", ""))
        series = str(ds.get("SeriesInstanceUID", ""))
        modality = str(ds.get("Modality", "") or "")
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError) as exc:
        raise Rejected(
            CANNOT_UNDERSTAND, f"dataset cannot be parsed ({type(exc).__name__})"
        ) from exc
    if sop != affected_sop_instance_uid:
        raise Rejected(DOES_NOT_MATCH, "dataset SOP Instance UID differs from the request's")
    for name, value in (("Study Instance UID", study), ("Series Instance UID", series)):
        if not _is_uid(value):
            raise Rejected(DOES_NOT_MATCH, f"{name} is missing or not a valid UID")
    if not _is_uid(sop):
        raise Rejected(DOES_NOT_MATCH, "SOP Instance UID is not a valid UID")
    return Identity(sop, study, series, modality.strip().upper()[:16])


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(p.isdigit() for p in value.split("."))


class Receiver:
    """Bridges pynetdicom's association threads to the asyncio loop that owns NATS."""

    def __init__(
        self, transport: Transport, loop: asyncio.AbstractEventLoop, publish_timeout: float
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._timeout = publish_timeout

    def on_echo(self, event: Any) -> int:
        return SUCCESS

    def on_store(self, event: Any) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        called = str(event.assoc.acceptor.ae_title).strip()
        try:
            part10 = event.encoded_dataset(include_meta=True)
            request = event.request
            identity = identify(part10, str(request.AffectedSOPInstanceUID))
            instance = Instance(
                sop_class_uid=str(request.AffectedSOPClassUID),
                sop_instance_uid=identity.sop_instance_uid,
                study_uid=identity.study_uid,
                series_uid=identity.series_uid,
                modality=identity.modality,
                calling_ae=calling,
                called_ae=called,
                transfer_syntax=str(event.context.transfer_syntax),
                size=len(part10),
                sha256=hashlib.sha256(part10).hexdigest(),
            )
            self._publish(instance, part10)
        except Rejected as exc:
            log.warning("C-STORE from %s refused with 0x%04X: %s", calling, exc.status, exc)
            return exc.status
        except BrokerUnavailable as exc:
            log.error("C-STORE from %s answered 0xA700: %s", calling, exc)
            return OUT_OF_RESOURCES
        except Exception:
            # Anything unforeseen: the instance is not safe, so never Success.
            log.exception("C-STORE from %s failed unexpectedly; answered 0xA700", calling)
            return OUT_OF_RESOURCES
        return SUCCESS

    def _publish(self, instance: Instance, part10: bytes) -> None:
        coro = self._transport.publish(
            subjects.ingest_subject(instance.called_ae, instance.calling_ae),
            instance,
            io.BytesIO(part10),
            len(part10),
            blob_prefix="ingest",
        )
        future: Future[Instance] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            future.result(timeout=self._timeout * 3)
        except FutureTimeout as exc:
            future.cancel()
            raise BrokerUnavailable("publish did not complete in time") from exc
