"""The encryptor stage.

For each INGEST message: read the body (inline or blob), check it against the
gateway's size and SHA-256 (a mismatch is a contract violation: dead-lettered, never
published), seal it under the current master key, publish the envelope to SEALED, and
only then ack. An inline body is sealed in memory; a blob is sealed chunk by chunk from
the plaintext bucket into the sealed one. The consumed blob is deleted after the ack.

A message that is dead-lettered is sealed first (``dead_letter``): the DLQ keeps a
signed SEALED message, which `dicomflow dlq replay` republishes onto SEALED, and the
plaintext blob is deleted. A body that cannot be sealed as the instance it claims to be
(headers off, blob gone, bytes not matching the gateway's digest) is not kept at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
from collections.abc import AsyncGenerator

from dicomflow.encryptor.sealing import HashingSealer, seal_and_hash
from dicomflow.encryptor.settings import EncryptorSettings
from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.deadletters import H_DLQ_BODY
from dicomflow.shared.contracts.messages import SEALED_BLOB_PREFIX, BodyKind, Instance
from dicomflow.shared.crypto import keycheck
from dicomflow.shared.crypto.envelope import OVERHEAD
from dicomflow.shared.crypto.keyload import load_keyring, load_signer
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey
from dicomflow.shared.crypto.sealsign import SealSigner
from dicomflow.shared.errors import ContractViolation
from dicomflow.shared.nats import blobsweeper, hybridtopology, natsconn, topology
from dicomflow.shared.nats.transport import Transport, blob_name
from dicomflow.shared.stage.consumer import AfterAck, Consumer, Letter, dropped
from dicomflow.shared.telemetry.bundle import Telemetry
from dicomflow.shared.telemetry.tracing import Tracing
from nats.aio.msg import Msg
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

STAGE = "encryptor"


class Encryptor:
    def __init__(
        self,
        transport: Transport,
        keyring: KeyRing,
        signer: SealSigner,
        tracing: Tracing,
        sealed: Transport | None = None,
    ) -> None:
        """``transport`` reads INGEST bodies and deletes plaintext blobs; ``sealed``
        (default: the same) publishes SEALED and writes sealed blobs (a hybrid edge
        keeps the two sides in separate NATS accounts)."""
        self._transport = transport
        self._sealed = sealed or transport
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
            self._sealed.spool(instance.size + OVERHEAD) as sealed_file,
        ):
            sealed = await asyncio.to_thread(seal_and_hash, key, plain, sealed_file)
            _check_plaintext(instance, sealed.plaintext_size, sealed.plaintext_sha256)
            sealed_file.seek(0)
            out = self._signed(instance, key.key_id, sealed.sealed_size, sealed.sealed_sha256)
            await self._sealed.publish(
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

        name = blob_name(SEALED_BLOB_PREFIX, instance)
        sealed_size, sealed_sha256 = await self._sealed.put_blob(
            name, self._sealed_pieces(instance, sealer)
        )
        try:
            _check_plaintext(instance, sealer.size, sealer.plaintext_sha256)
        except ContractViolation:
            await self._sealed.delete_blob_named(name)
            raise
        out = self._signed(instance, key.key_id, sealed_size, sealed_sha256)
        await self._sealed.publish_blob(subject, out, name)

    async def _sealed_pieces(
        self, instance: Instance, sealer: HashingSealer
    ) -> AsyncGenerator[bytes, None]:
        """The A1 envelope of ``instance``'s plaintext blob, piece by piece: read from the
        plaintext bucket, sealed (and hashed) in a worker thread."""
        yield sealer.prefix
        chunks = self._transport.blob_chunks(instance)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield await asyncio.to_thread(sealer.update, chunk)
        yield sealer.finalize()

    async def dead_letter(self, msg: Msg) -> Letter:
        """What the DLQ keeps of an INGEST message instead of its plaintext: the instance
        sealed under the current key and signed, as the encryptor would have published
        it to SEALED (the consumer's ``letter`` hook). Its plaintext blob is deleted once
        the letter is in the DLQ. Kept as a separate step from ``handle``: it runs only
        for a message that failed, and publishes nothing to SEALED."""
        headers = dict(msg.headers or {})
        try:
            instance = messages.parse(msg.headers)
        except ContractViolation:
            return dropped(headers, "body not kept: its headers break the contract")
        delete_plain = functools.partial(self._transport.delete_blob, instance)
        key = self._keyring.current
        try:
            if instance.body is BodyKind.BLOB:
                sealed, data = await self._seal_blob_for_letter(instance, key), b""
            else:
                sealed, data = await self._seal_inline_for_letter(msg, instance, key)
        except _Unsealable as exc:
            return dropped(headers, f"body not kept: {exc}", delete_plain)
        out = {**sealed.headers(), H_DLQ_BODY: "sealed"}
        return Letter(out, data, f"body sealed under master key {sealed.key_id}", delete_plain)

    async def _seal_inline_for_letter(
        self, msg: Msg, instance: Instance, key: MasterKey
    ) -> tuple[Instance, bytes]:
        sealed_file = io.BytesIO()
        result = await asyncio.to_thread(seal_and_hash, key, io.BytesIO(msg.data), sealed_file)
        try:
            _check_plaintext(instance, result.plaintext_size, result.plaintext_sha256)
        except ContractViolation as exc:
            raise _Unsealable(str(exc)) from None
        out = self._signed(instance, key.key_id, result.sealed_size, result.sealed_sha256)
        return out, sealed_file.getvalue()

    async def _seal_blob_for_letter(self, instance: Instance, key: MasterKey) -> Instance:
        sealer = HashingSealer(key)

        name = blob_name(SEALED_BLOB_PREFIX, instance)
        try:
            sealed_size, sealed_sha256 = await self._sealed.put_blob(
                name, self._sealed_pieces(instance, sealer)
            )
        except ContractViolation:
            raise _Unsealable("its plaintext blob is missing") from None
        try:
            _check_plaintext(instance, sealer.size, sealer.plaintext_sha256)
        except ContractViolation as exc:
            await self._sealed.delete_blob_named(name)
            raise _Unsealable(str(exc)) from None
        out = self._signed(instance, key.key_id, sealed_size, sealed_sha256)
        return out.with_body(BodyKind.BLOB, name)

    def _signed(
        self, instance: Instance, key_id: int, sealed_size: int, sealed_sha256: str
    ) -> Instance:
        return self._tracing.propagate(
            self._signer.sign(instance.sealed(key_id, sealed_size, sealed_sha256))
        )


class _Unsealable(Exception):
    """The body cannot be sealed as the instance its headers describe."""


def _check_plaintext(instance: Instance, size: int, sha256: str) -> None:
    if (size, sha256) != (instance.size, instance.sha256):
        raise ContractViolation("body does not match its Dicomflow-Size/Dicomflow-Sha256 headers")


async def serve(settings: EncryptorSettings, stop: asyncio.Event, telemetry: Telemetry) -> None:
    keyring = load_keyring(settings.encryption)  # refuses to start without a usable key
    signer = load_signer(settings.encryption)  # and without its signing key
    nc = await natsconn.connect(settings.nats, STAGE, stop)
    telemetry.readiness.add_nats(nc)
    sealed_nc = None
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
        sealed: Transport | None = None
        if settings.nats_sealed is not None:  # a hybrid edge: the sealed side's account
            sealed_nc = await natsconn.connect(settings.nats_sealed, f"{STAGE}-sealed", stop)
            telemetry.readiness.add_nats(sealed_nc)
            await topology.ensure(sealed_nc.jetstream(), settings.nats_sealed)
            sealed = Transport(
                sealed_nc,
                sealed_nc.jetstream(),
                publish_timeout=settings.nats_sealed.publish_timeout,
                spool_dir=settings.spool_dir,
            )
        encryptor = Encryptor(transport, keyring, signer, telemetry.tracing, sealed)
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
            letter=encryptor.dead_letter,
        )
        telemetry.readiness.started()
        if sealed_nc is None:
            await blobsweeper.consume_and_sweep(js, consumer, settings.nats, stop)
        else:
            # The edge's sealed blobs leave for the cloud (interest retention), so only
            # the plaintext bucket is swept here; the janitor clears what the uplink
            # left behind below its ack floor.
            nats = settings.nats
            await asyncio.gather(
                consumer.run(stop),
                blobsweeper.run_periodically(
                    js,
                    nats.blob_sweep_interval,
                    nats.blob_orphan_grace,
                    stop,
                    (subjects.INGEST_BLOB_BUCKET,),
                ),
                hybridtopology.run_janitor(sealed_nc.jetstream(), stop),
            )
    finally:
        if sealed_nc is not None:
            await sealed_nc.drain()
        await nc.drain()
