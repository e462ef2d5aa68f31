"""Delivering one request: read the object from storage, decrypt it, C-STORE it.

The sealed object is downloaded into a private temporary folder (mode 0700), decrypted
with the key ring into a second file that exists only once the GCM tag verified, and
checked against the request's size and SHA-256 before a single byte goes to the peer.
Both files are gone when the handler returns, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
from pathlib import Path

from nats.aio.msg import Msg

from dicomflow.scu_gateway import request
from dicomflow.scu_gateway.association import AssociationPool
from dicomflow.scu_gateway.status import DeliveryRefused, error_for
from dicomflow.shared import storage
from dicomflow.shared.consumer import AfterAck
from dicomflow.shared.envelope import open_to_path
from dicomflow.shared.errors import ContractViolation, PermanentError
from dicomflow.shared.keyring import KeyRing
from dicomflow.shared.messages import Instance
from dicomflow.shared.settings import DestinationSettings
from dicomflow.shared.storage import ObjectStore

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


class ObjectMissing(PermanentError):
    """The object a delivery request names is not in storage."""


class ObjectMismatch(PermanentError):
    """The decrypted object is not the instance the request describes."""


class Deliverer:
    """The handler of one destination's delivery consumer."""

    def __init__(
        self,
        name: str,
        destination: DestinationSettings,
        pool: AssociationPool,
        store: ObjectStore,
        keyring: KeyRing,
        spool_dir: Path | None = None,
    ) -> None:
        self._name = name
        self._syntaxes = set(destination.transfer_syntaxes)
        self._pool = pool
        self._store = store
        self._keyring = keyring
        self._spool_dir = spool_dir

    async def handle(self, msg: Msg) -> AfterAck | None:
        req = request.parse(msg.headers)
        if req.destination != self._name:
            raise ContractViolation(
                f"request for destination {req.destination} reached the consumer of {self._name}"
            )
        instance = req.instance
        if self._syntaxes and instance.transfer_syntax not in self._syntaxes:
            raise DeliveryRefused(
                f"{self._name} is configured for other transfer syntaxes than the stored "
                f"{instance.transfer_syntax} (dicomflow does not transcode)"
            )
        with tempfile.TemporaryDirectory(dir=self._spool_dir, prefix="dicomflow-scu-") as tmp:
            sealed, plain = Path(tmp) / "object.enc", Path(tmp) / "instance.dcm"
            await self._download(req.object_key, sealed)
            await asyncio.to_thread(_decrypt_verified, self._keyring, sealed, plain, instance)
            sealed.unlink()
            status = await asyncio.to_thread(
                self._pool.store, plain, (instance.sop_class_uid, instance.transfer_syntax)
            )
        error = error_for(status, self._name)
        if error is not None:
            raise error
        log.info(
            "delivered to %s: status 0x%04X (delivery %d)",
            self._name,
            status,
            msg.metadata.num_delivered,
        )
        return None

    async def _download(self, key: str, out: Path) -> None:
        try:
            with out.open("wb") as f:
                async for chunk in storage.read_chunks(self._store, key):
                    f.write(chunk)
        except FileNotFoundError as exc:
            raise ObjectMissing("the object named by the request is not in storage") from exc


def _decrypt_verified(keyring: KeyRing, sealed: Path, plain: Path, instance: Instance) -> None:
    with sealed.open("rb") as src:
        size = open_to_path(keyring, src, sealed.stat().st_size, plain)
    digest = hashlib.sha256()
    with plain.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    if (size, digest.hexdigest()) != (instance.size, instance.sha256):
        raise ObjectMismatch(
            "decrypted object does not match the request's Dicomflow-Size/Dicomflow-Sha256"
        )
