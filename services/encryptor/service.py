"""The encryptor stage: a ``StageSpec`` (``spec``) and its handler (``Encryptor``).

For each INGEST delivery: read the body (inline or blob), checked against the gateway's
size and SHA-256 (a mismatch is a contract violation: dead-lettered, never published),
seal it under the current master key, publish the envelope to SEALED, and only then
ack. An inline body is sealed in memory; a blob is sealed chunk by chunk from the
plaintext bucket into the sealed one. The consumed blob is deleted after the ack.

A message that is dead-lettered is sealed first (``dead_letter``): the DLQ keeps a
signed SEALED message, which `dicomflow dlq replay` republishes onto SEALED, and the
plaintext blob is deleted. A body that cannot be sealed as the instance it claims to be
(headers off, blob gone, bytes not matching the gateway's digest) is not kept at all.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging

from dicomflow.encryptor.sealing import seal_bytes, sealed_pieces
from dicomflow.encryptor.settings import EncryptorSettings
from dicomflow.shared.contracts import subjects
from dicomflow.shared.contracts.deadletters import H_DLQ_BODY
from dicomflow.shared.contracts.messages import SEALED_BLOB_PREFIX, BodyKind, Instance
from dicomflow.shared.crypto import keycheck
from dicomflow.shared.crypto.keyload import load_keyring, load_signer
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey
from dicomflow.shared.crypto.sealsign import SealSigner
from dicomflow.shared.errors import ContractViolation
from dicomflow.shared.nats import hybridtopology
from dicomflow.shared.nats.transport import Transport, blob_name
from dicomflow.shared.stage import bootstrap, delivery
from dicomflow.shared.stage.bootstrap import Wiring
from dicomflow.shared.stage.consumer import Letter, dropped
from dicomflow.shared.stage.delivery import AfterAck, Body, Delivery
from dicomflow.shared.stage.spec import Parts, StageSpec
from dicomflow.shared.telemetry.bundle import Telemetry
from dicomflow.shared.telemetry.tracing import Tracing

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
        """``transport`` deletes plaintext blobs; ``sealed`` (default: the same)
        publishes SEALED and writes sealed blobs (a hybrid edge keeps the two sides in
        separate NATS accounts)."""
        self._transport = transport
        self._sealed = sealed or transport
        self._keyring = keyring
        self._signer = signer
        self._tracing = tracing

    async def handle(self, delivery: Delivery[Instance]) -> AfterAck:
        instance = delivery.record
        subject = subjects.sealed_subject(instance.called_ae, instance.calling_ae)
        if instance.body is BodyKind.BLOB:
            await self._seal_blob(instance, delivery.body, subject)
        else:
            await self._seal_inline(instance, delivery.body, subject)

        async def after_ack() -> None:
            await self._transport.delete_blob(instance)

        return after_ack

    async def _seal_inline(self, instance: Instance, body: Body, subject: str) -> None:
        """An inline body is checked against the gateway's size and digest, sealed and
        its envelope hashed in one worker-thread hop (``Body.apply``): a mismatch
        raises there, before anything is sealed or published. The envelope is
        published from memory (a blob only if sealing took it over the inline limit)."""
        key = self._keyring.current
        envelope, sealed_sha256 = await body.apply(functools.partial(seal_bytes, key))
        out = self._signed(instance, key.key_id, len(envelope), sealed_sha256)
        await self._sealed.publish(
            subject, out, io.BytesIO(envelope), len(envelope), blob_prefix=SEALED_BLOB_PREFIX
        )

    async def _seal_blob(self, instance: Instance, body: Body, subject: str) -> None:
        """Plaintext blob in, sealed blob out, one chunk at a time: read from the
        plaintext bucket, sealed in a worker thread, put into the sealed bucket,
        overlapped by the put's window. No plaintext touches this stage's disk and
        nothing is read twice; the plaintext's size and SHA-256 are checked against the
        gateway's headers before the last piece is sealed (``Body.stream``), so a
        mismatch leaves no sealed blob and no sealed message."""
        key = self._keyring.current
        name = blob_name(SEALED_BLOB_PREFIX, instance)
        sealed_size, sealed_sha256 = await self._sealed.put_blob(
            name, sealed_pieces(key, body.stream())
        )
        out = self._signed(instance, key.key_id, sealed_size, sealed_sha256)
        await self._sealed.publish_blob(subject, out, name)

    async def dead_letter(self, delivery: Delivery[Instance]) -> Letter:
        """What the DLQ keeps of an INGEST message instead of its plaintext: the instance
        sealed under the current key and signed, as the encryptor would have published
        it to SEALED (the consumer's ``letter`` hook). Its plaintext blob is deleted once
        the letter is in the DLQ. Kept as a separate step from ``handle``: it runs only
        for a message that failed, and publishes nothing to SEALED. (A message whose
        headers break the contract never gets here: the consumer drops its body.)"""
        headers = dict(delivery.message.headers or {})
        instance = delivery.record
        delete_plain = functools.partial(self._transport.delete_blob, instance)
        key = self._keyring.current
        try:
            if instance.body is BodyKind.BLOB:
                sealed, data = await self._seal_blob_for_letter(instance, delivery.body, key), b""
            else:
                sealed, data = await self._seal_inline_for_letter(instance, delivery.body, key)
        except _Unsealable as exc:
            return dropped(headers, f"body not kept: {exc}", delete_plain)
        out = {**sealed.headers(), H_DLQ_BODY: "sealed"}
        return Letter(out, data, f"body sealed under master key {sealed.key_id}", delete_plain)

    async def _seal_inline_for_letter(
        self, instance: Instance, body: Body, key: MasterKey
    ) -> tuple[Instance, bytes]:
        try:
            envelope, sealed_sha256 = await body.apply(functools.partial(seal_bytes, key))
        except ContractViolation as exc:
            raise _Unsealable(str(exc)) from None
        return self._signed(instance, key.key_id, len(envelope), sealed_sha256), envelope

    async def _seal_blob_for_letter(
        self, instance: Instance, body: Body, key: MasterKey
    ) -> Instance:
        name = blob_name(SEALED_BLOB_PREFIX, instance)
        try:
            sealed_size, sealed_sha256 = await self._sealed.put_blob(
                name, sealed_pieces(key, body.stream())
            )
        except ContractViolation as exc:
            if body.failed_check:
                raise _Unsealable(str(exc)) from None
            raise _Unsealable("its plaintext blob is missing") from None
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


def spec(settings: EncryptorSettings) -> StageSpec[Instance]:
    """The encryptor: INGEST in, SEALED out. It sweeps orphaned blobs of both buckets;
    at a hybrid edge (``nats_sealed``) only the plaintext one, since its sealed blobs
    leave for the cloud (interest retention) and a janitor clears what the uplink left
    behind below its ack floor."""
    keyring = load_keyring(settings.encryption)  # refuses to start without a usable key
    signer = load_signer(settings.encryption)  # and without its signing key

    async def build(wiring: Wiring) -> Parts[Instance]:
        await keycheck.check(wiring.js, keyring)  # refuses a key file that is not its id's key
        sealed: Transport | None = None
        if settings.nats_sealed is not None:  # a hybrid edge: the sealed side's account
            link = await wiring.connect(settings.nats_sealed, "sealed")
            sealed = link.transport
            wiring.beside(functools.partial(hybridtopology.run_janitor, link.js))
        encryptor = Encryptor(wiring.transport, keyring, signer, wiring.telemetry.tracing, sealed)
        log.info(
            "encryptor ready; current master key id %d, signing key %s",
            keyring.current.key_id,
            signer.signer,
        )
        return Parts(delivery.concurrently(encryptor.handle), letter=encryptor.dead_letter)

    at_edge = settings.nats_sealed is not None
    return StageSpec(
        name=STAGE,
        stream=subjects.INGEST_STREAM,
        durable=subjects.ENCRYPTOR_DURABLE,
        decoder=delivery.ingest,
        build=build,
        sweeps=(subjects.INGEST_BLOB_BUCKET,) if at_edge else subjects.BLOB_BUCKETS,
        batch=None,  # consumer.batch
    )


async def serve(settings: EncryptorSettings, stop: asyncio.Event, telemetry: Telemetry) -> None:
    await bootstrap.serve(spec(settings), settings, stop, telemetry)
