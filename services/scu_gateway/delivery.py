"""Delivering one request: read the object from storage, decrypt it, C-STORE it.

A request relayed before storage (``request.RELAY_SEALED``) carries the sealed object as
its body: it is decrypted from there, and storage is not read at all.

The plaintext goes into the deliverer's private spool folder (mode 0700, one file per
instance, mode 0600) and is handed to the sender threads (``sender``) only once the GCM
tag verified and the SHA-256 and size matched the request, before a single byte goes to
the peer. It is removed once its C-STORE ended (or failed before), whatever the outcome;
``close`` removes the folder, and the next start removes the folder of a process that
died without closing (``spool``).

An object of up to ``IN_MEMORY_MAX`` sealed bytes is read in one ranged GET (far
cheaper than obstore's stream for one small object) and decrypted in memory, and the
plaintext written to its file only after it verified; a larger one streams from
storage to disk (``shared.retrieval.fetch_verified``), in constant memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from pathlib import Path

from dicomflow.scu_gateway.association import AssociationPool
from dicomflow.scu_gateway.health import DestinationHealth
from dicomflow.scu_gateway.sender import Senders
from dicomflow.scu_gateway.settings import DestinationSettings
from dicomflow.scu_gateway.status import DeliveryRefused, DestinationUnreachable, error_for
from dicomflow.shared.contracts import deliveries
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.crypto.keyring import KeyRing
from dicomflow.shared.errors import (
    ContractViolation,
    DigestMismatch,
    IntegrityError,
    ObjectMissing,
)
from dicomflow.shared.spoolfolder import SpoolFolder
from dicomflow.shared.stage.consumer import AfterAck
from dicomflow.shared.storage import objectstore, retrieval
from dicomflow.shared.storage.objectstore import ObjectStore
from nats.aio.msg import Msg

log = logging.getLogger(__name__)

SPOOL_PREFIX = "dicomflow-scu-"  # the scu-gateway's folders under spool_dir

IN_MEMORY_MAX = 8 * 1024**2  # sealed bytes


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
        health: DestinationHealth | None = None,
    ) -> None:
        """``health``, if given, is told when the peer cannot be reached (it then holds
        the destination's consumer until a C-ECHO gets through)."""
        self._name = name
        self._health = health
        self._syntaxes = set(destination.transfer_syntaxes)
        # Workers outnumber associations (see service.delivery_consumer) so that the next
        # instances are fetched and decrypted while one is on the wire; max_associations
        # sender threads send them (started last: nothing to stop if the spool fails).
        self._store = store
        self._keyring = keyring
        # sweeps the folders of scu-gateway processes that died
        self._spool_folder = SpoolFolder(spool_dir, name, SPOOL_PREFIX, "scu-gateway")
        self._spool = self._spool_folder.path
        self._names = itertools.count()
        self._senders = Senders(pool, destination.max_associations)

    def close(self) -> None:
        """Stop the sender threads and remove the spool folder (blocking)."""
        self._senders.close()
        self._spool_folder.close()

    async def handle(self, msg: Msg) -> AfterAck | None:
        req = deliveries.parse(msg.headers)
        deliveries.check_body(req, msg.data)
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
        plain = self._spool / f"{next(self._names)}.dcm"
        handed = False
        try:
            if req.relayed:
                await self._open(msg.data, instance, plain)
            else:
                await self._fetch(req.object_key, instance, plain)
            sending = self._senders.submit(
                plain, (instance.sop_class_uid, instance.transfer_syntax)
            )
            handed = True  # the senders remove the file from here on
            status = await sending.status()
        except DestinationUnreachable as exc:
            if self._health is not None:
                self._health.down(str(exc))
            raise
        finally:
            if not handed:
                plain.unlink(missing_ok=True)
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

    async def _fetch(self, object_key: str, instance: Instance, out: Path) -> None:
        """Create ``out`` holding the verified plaintext of the instance, or raise."""
        sealed_size = instance.sealed_size
        if sealed_size is not None and sealed_size <= IN_MEMORY_MAX:
            try:
                # One ranged GET, never more than the record names (plus one byte, to
                # notice a longer object): memory stays bounded whatever is stored.
                sealed = await objectstore.read_range(self._store, object_key, 0, sealed_size + 1)
            except FileNotFoundError as exc:
                raise ObjectMissing(f"object {object_key} is missing from storage") from exc
            if len(sealed) != sealed_size:
                raise IntegrityError(
                    f"object {object_key} is not the {sealed_size} bytes its record names"
                )
            await self._open(sealed, instance, out)
            return
        size = await retrieval.fetch_verified(
            self._store,
            self._keyring,
            object_key=object_key,
            sha256=instance.sha256,
            out=out,
            scratch=self._spool,
        )
        if size != instance.size:
            raise DigestMismatch("decrypted object is not the size the request names")

    async def _open(self, sealed: bytes, instance: Instance, out: Path) -> None:
        """Create ``out`` holding the verified plaintext of ``sealed``, or raise."""
        size = await asyncio.to_thread(self._open_into, sealed, instance.sha256, out)
        if size != instance.size:
            raise DigestMismatch("decrypted object is not the size the request names")

    def _open_into(self, sealed: bytes, sha256: str, out: Path) -> int:
        plain = retrieval.open_verified(self._keyring, sealed, sha256)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(plain)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        return len(plain)
