"""Delivering one request: read the object from storage, decrypt it, C-STORE it.

The plaintext is written into a private temporary folder (mode 0700) only once the GCM
tag verified and the SHA-256 and size matched the request (``shared.retrieval``), before
a single byte goes to the peer. It is gone when the handler returns, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from pathlib import Path

from nats.aio.msg import Msg

from dicomflow.scu_gateway import request
from dicomflow.scu_gateway.association import AssociationPool
from dicomflow.scu_gateway.status import DeliveryRefused, error_for
from dicomflow.shared import retrieval
from dicomflow.shared.consumer import AfterAck
from dicomflow.shared.errors import ContractViolation, DigestMismatch
from dicomflow.shared.keyring import KeyRing
from dicomflow.shared.settings import DestinationSettings
from dicomflow.shared.storage import ObjectStore

log = logging.getLogger(__name__)


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
        # Workers outnumber associations (see service.delivery_consumer) so that the next
        # instance is fetched and decrypted while this one is on the wire; only
        # max_associations of them send at once.
        self._sending = asyncio.Semaphore(destination.max_associations)
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
            plain = Path(tmp) / "instance.dcm"
            size = await retrieval.fetch_verified(
                self._store,
                self._keyring,
                object_key=req.object_key,
                sha256=instance.sha256,
                out=plain,
                scratch=self._spool_dir,
            )
            if size != instance.size:
                raise DigestMismatch("decrypted object is not the size the request names")
            async with self._sending:
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
