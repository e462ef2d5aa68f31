"""The encryptor stage.

For each INGEST message: read the body (inline or blob), check it against the
gateway's size and SHA-256 (a mismatch is a contract violation: dead-lettered, never
published), seal it under the current master key, publish the envelope to SEALED, and
only then ack. An inline body is sealed in memory; a blob is sealed chunk by chunk from
the plaintext bucket into the sealed one. The consumed blob is deleted after the ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from dicomflow.encryptor.sealing import HashingSealer, seal_and_hash
from dicomflow.shared import blobsweeper, keycheck, messages, natsconn, subjects, topology
from dicomflow.shared.consumer import AfterAck, Consumer
from dicomflow.shared.envelope import OVERHEAD
from dicomflow.shared.errors import ContractViolation
from dicomflow.shared.keyring import KeyRing
from dicomflow.shared.messages import SEALED_BLOB_PREFIX, BodyKind, Instance
from dicomflow.shared.sealsign import SealSigner
from dicomflow.shared.settings import EncryptorSettings
from dicomflow.shared.telemetry import Telemetry
from dicomflow.shared.tracing import Tracing
from dicomflow.shared.transport import Transport, blob_name

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
        subject = subjects.sealed_subject(instance.called_ae, instance.calling_ae)
        if instance.body is BodyKind.BLOB:
            await self._seal_blob(instance, subject)
        else:
            await self._seal_inline(msg, instance, subject)

        async def after_ack() -> None:
            await self._transport.delete_blob(instance)

        return after_ack

    async def _seal_inline(self, msg: Msg, instance: Instance, subject: str) -> None:
        key = self._keyring.current
        with (
            await self._transport.open_body(msg, instance) as plain,
            self._transport.spool(instance.size + OVERHEAD) as sealed_file,
        ):
            sealed = await asyncio.to_thread(seal_and_hash, key, plain, sealed_file)
            _check_plaintext(instance, sealed.plaintext_size, sealed.plaintext_sha256)
            sealed_file.seek(0)
            out = self._signed(instance, key.key_id, sealed.sealed_size, sealed.sealed_sha256)
            await self._transport.publish(
                subject, out, sealed_file, sealed.sealed_size, blob_prefix=SEALED_BLOB_PREFIX
            )

    async def _seal_blob(self, instance: Instance, subject: str) -> None:
        """Plaintext blob in, sealed blob out, one chunk at a time: read from the
        plaintext bucket, sealed (and hashed) in a worker thread, put into the sealed
        bucket, overlapped by the put's window. No plaintext touches this stage's disk
        and nothing is read twice; the plaintext's size and SHA-256 are checked against
        the gateway's headers before the sealed message exists (a mismatch leaves only
        a sealed blob, deleted at once)."""
        key = self._keyring.current
        sealer = HashingSealer(key)

        async def sealed_pieces() -> AsyncGenerator[bytes, None]:
            yield sealer.prefix
            chunks = self._transport.blob_chunks(instance)
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield await asyncio.to_thread(sealer.update, chunk)
            yield sealer.finalize()

        name = blob_name(SEALED_BLOB_PREFIX, instance)
        sealed_size, sealed_sha256 = await self._transport.put_blob(name, sealed_pieces())
        try:
            _check_plaintext(instance, sealer.size, sealer.plaintext_sha256)
        except ContractViolation:
            await self._transport.delete_blob_named(name)
            raise
        out = self._signed(instance, key.key_id, sealed_size, sealed_sha256)
        await self._transport.publish_blob(subject, out, name)

    def _signed(
        self, instance: Instance, key_id: int, sealed_size: int, sealed_sha256: str
    ) -> Instance:
        return self._tracing.propagate(
            self._signer.sign(instance.sealed(key_id, sealed_size, sealed_sha256))
        )


def _check_plaintext(instance: Instance, size: int, sha256: str) -> None:
    if (size, sha256) != (instance.size, instance.sha256):
        raise ContractViolation("body does not match its Dicomflow-Size/Dicomflow-Sha256 headers")


async def serve(settings: EncryptorSettings, stop: asyncio.Event, telemetry: Telemetry) -> None:
    keyring = settings.encryption.keyring()  # refuses to start without a usable key
    signer = settings.encryption.signer()  # and without its signing key
    nc = await natsconn.connect(settings.nats, STAGE, stop)
    telemetry.readiness.add_nats(nc)
    try:
        js: JetStreamContext = nc.jetstream()
        await topology.ensure(js, settings.nats)
        await keycheck.check(js, keyring)  # refuses a key file that is not its id's key
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
