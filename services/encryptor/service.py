"""The encryptor stage.

For each INGEST message: read the body (inline or blob), check it against the
gateway's size and SHA-256 (a mismatch is a contract violation: dead-lettered, never
sealed), seal it under the current master key into a private spool file, publish the
envelope to SEALED, and only then ack. The consumed blob is deleted after the ack.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from dicomflow.encryptor.sealing import seal_and_hash
from dicomflow.shared import blobsweeper, messages, natsconn, subjects, topology
from dicomflow.shared.consumer import AfterAck, Consumer
from dicomflow.shared.envelope import OVERHEAD
from dicomflow.shared.errors import ContractViolation
from dicomflow.shared.keyring import KeyRing
from dicomflow.shared.sealsign import SealSigner
from dicomflow.shared.settings import EncryptorSettings
from dicomflow.shared.telemetry import Telemetry
from dicomflow.shared.tracing import Tracing
from dicomflow.shared.transport import Transport

log = logging.getLogger(__name__)

STAGE = "encryptor"


class Encryptor:
    def __init__(
        self, transport: Transport, keyring: KeyRing, signer: SealSigner, tracing: Tracing
    ) -> None:
        self._transport = transport
        self._keyring = keyring
        self._signer = signer
        self._tracing = tracing

    async def handle(self, msg: Msg) -> AfterAck:
        instance = messages.parse(msg.headers)
        key = self._keyring.current
        with (
            await self._transport.open_body(msg, instance) as plain,
            self._transport.spool(instance.size + OVERHEAD) as sealed_file,
        ):
            sealed = await asyncio.to_thread(seal_and_hash, key, plain, sealed_file)
            if (sealed.plaintext_size, sealed.plaintext_sha256) != (instance.size, instance.sha256):
                raise ContractViolation(
                    "body does not match its Dicomflow-Size/Dicomflow-Sha256 headers"
                )
            sealed_file.seek(0)
            out = self._tracing.propagate(
                self._signer.sign(
                    instance.sealed(key.key_id, sealed.sealed_size, sealed.sealed_sha256)
                )
            )
            await self._transport.publish(
                subjects.sealed_subject(instance.called_ae, instance.calling_ae),
                out,
                sealed_file,
                sealed.sealed_size,
                blob_prefix="sealed",
            )

        async def after_ack() -> None:
            await self._transport.delete_blob(instance)

        return after_ack


async def serve(settings: EncryptorSettings, stop: asyncio.Event, telemetry: Telemetry) -> None:
    keyring = settings.encryption.keyring()  # refuses to start without a usable key
    signer = settings.encryption.signer()  # and without its signing key
    nc = await natsconn.connect(settings.nats, STAGE, stop)
    telemetry.readiness.add_nats(nc)
    try:
        js: JetStreamContext = nc.jetstream()
        await topology.ensure(js, settings.nats)
        await topology.ensure_consumer(
            js, subjects.INGEST_STREAM, subjects.ENCRYPTOR_DURABLE, settings.consumer
        )
        transport = Transport(
            nc, js, publish_timeout=settings.nats.publish_timeout, spool_dir=settings.spool_dir
        )
        encryptor = Encryptor(transport, keyring, signer, telemetry.tracing)
        log.info(
            "encryptor ready; current master key id %d, signing key %s",
            keyring.current.key_id,
            signer.signer,
        )
        consumer = Consumer(
            js,
            stage=STAGE,
            stream=subjects.INGEST_STREAM,
            durable=subjects.ENCRYPTOR_DURABLE,
            handler=encryptor.handle,
            settings=settings.consumer,
            telemetry=telemetry,
        )
        telemetry.readiness.started()
        await blobsweeper.consume_and_sweep(js, consumer, settings.nats, stop)
    finally:
        await nc.drain()
