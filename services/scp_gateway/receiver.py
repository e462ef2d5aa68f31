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
import logging
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, BinaryIO

from dicomflow.scp_gateway.identity import Identity, Unreadable, read_identity
from dicomflow.shared import subjects
from dicomflow.shared.errors import BrokerUnavailable
from dicomflow.shared.messages import Instance
from dicomflow.shared.transport import Transport

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210

_CHUNK = 1024 * 1024


class Rejected(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def identify(fp: BinaryIO, affected_sop_instance_uid: str) -> Identity:
    """Read and check the identity we need; raise Rejected with the status to answer."""
    try:
        identity = read_identity(fp)
    except Unreadable as exc:
        raise Rejected(CANNOT_UNDERSTAND, str(exc)) from exc
    if identity.sop_instance_uid != affected_sop_instance_uid:
        raise Rejected(DOES_NOT_MATCH, "dataset SOP Instance UID differs from the request's")
    for name, value in (
        ("SOP Instance UID", identity.sop_instance_uid),
        ("Study Instance UID", identity.study_uid),
        ("Series Instance UID", identity.series_uid),
    ):
        if not _is_uid(value):
            raise Rejected(DOES_NOT_MATCH, f"{name} is missing or not a valid UID")
    return identity


def _is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and all(p.isdigit() for p in value.split("."))


def digest(fp: BinaryIO) -> tuple[int, str]:
    """Size and SHA-256 of ``fp`` from its start, read in chunks."""
    fp.seek(0)
    sha = hashlib.sha256()
    size = 0
    while chunk := fp.read(_CHUNK):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()


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
            request = event.request
            # pynetdicom spooled the dataset to a Part-10 file as it arrived (chunked
            # receive): it is never held whole in memory, here or later.
            with Path(event.dataset_path).open("rb") as fp:
                identity = identify(fp, str(request.AffectedSOPInstanceUID))
                size, sha256 = digest(fp)
                instance = Instance(
                    sop_class_uid=str(request.AffectedSOPClassUID),
                    sop_instance_uid=identity.sop_instance_uid,
                    study_uid=identity.study_uid,
                    series_uid=identity.series_uid,
                    modality=identity.modality,
                    calling_ae=calling,
                    called_ae=called,
                    transfer_syntax=str(event.context.transfer_syntax),
                    size=size,
                    sha256=sha256,
                )
                fp.seek(0)
                self._publish(instance, fp, size)
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

    def _publish(self, instance: Instance, body: BinaryIO, size: int) -> None:
        coro = self._transport.publish(
            subjects.ingest_subject(instance.called_ae, instance.calling_ae),
            instance,
            body,
            size,
            blob_prefix="ingest",
        )
        future: Future[Instance] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            future.result(timeout=self._timeout * 3)
        except FutureTimeout as exc:
            future.cancel()
            raise BrokerUnavailable("publish did not complete in time") from exc
