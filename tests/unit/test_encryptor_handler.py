"""The encryptor's handler on the typed seam, without a process: a real nats-server holds
the streams and blob buckets; deliveries are decoded as the consumer decodes them."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import nats
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dicomflow.encryptor.service import Encryptor
from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.messages import INGEST_BLOB_PREFIX, BodyKind, Instance
from dicomflow.shared.crypto.envelope import OVERHEAD, Sealer, open_bytes
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey
from dicomflow.shared.crypto.sealsign import SealSigner, SealVerifier
from dicomflow.shared.errors import ContractViolation
from dicomflow.shared.nats import topology
from dicomflow.shared.nats.transport import Transport, blob_name
from dicomflow.shared.settings import NatsSettings
from dicomflow.shared.stage import delivery
from dicomflow.shared.stage.consumer import H_DLQ_BODY
from dicomflow.shared.stage.delivery import Delivery
from dicomflow.shared.telemetry.tracing import Tracing
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from dicomflow.embedded.natsserver import NatsServer
from support.stage import ingest_message, instance

KEY = MasterKey(3, os.urandom(32))
SIGNING = Ed25519PrivateKey.generate()
VERIFIER = SealVerifier([SIGNING.public_key()])
INLINE_LIMIT = 4096  # bodies above this travel as blobs
T = TypeVar("T")


@dataclass
class Rig:
    nc: Client
    transport: Transport
    encryptor: Encryptor
    sealed: Subscription  # what the encryptor publishes to SEALED

    def deliver(self, msg: nats.aio.msg.Msg) -> Delivery[Instance]:
        return delivery.deliver(delivery.ingest(self.transport), msg)

    async def next_sealed(self) -> tuple[Instance, bytes]:
        """The next SEALED message: its verified headers and its sealed body."""
        msg = await self.sealed.next_msg(timeout=5)
        sealed = messages.parse(msg.headers, sealed=True, signed=True)
        VERIFIER.verify(sealed)
        if sealed.body is BodyKind.BLOB:
            with await self.transport.open_body(msg, sealed) as body:
                return sealed, body.read()
        return sealed, msg.data

    async def blobs(self, bucket: str) -> int:
        """How many blobs ``bucket`` holds."""
        store = await self.transport.blobs(bucket)
        try:
            return len(await store.list(ignore_deletes=True))
        except nats.js.errors.NotFoundError:  # nats-py's answer for an empty bucket
            return 0


@pytest.fixture
async def rig(nats_server: NatsServer) -> AsyncIterator[Rig]:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await topology.ensure(js, NatsSettings(servers=[nats_server.url]))
    transport = Transport(nc, js, publish_timeout=5.0, inline_limit=INLINE_LIMIT)
    sub = await nc.subscribe(f"{subjects.SEALED_PREFIX}.>")
    encryptor = Encryptor(transport, KeyRing(KEY), SealSigner(SIGNING), Tracing("test"))
    try:
        yield Rig(nc, transport, encryptor, sub)
    finally:
        await nc.close()


async def put_ingest_blob(rig: Rig, inst: Instance, data: bytes) -> Instance:
    async def pieces() -> AsyncIterator[bytes]:
        for at in range(0, len(data), 1000):
            yield data[at : at + 1000]

    name = blob_name(INGEST_BLOB_PREFIX, inst)
    await rig.transport.put_blob(name, pieces())
    return inst.with_body(BodyKind.BLOB, name)


async def test_an_inline_body_is_sealed_signed_and_published(rig: Rig) -> None:
    plain = os.urandom(1000)
    inst = instance(plain)
    after_ack = await rig.encryptor.handle(rig.deliver(ingest_message(inst, plain)))
    sealed, body = await rig.next_sealed()
    assert sealed.body is BodyKind.INLINE
    assert (sealed.key_id, sealed.sealed_size) == (KEY.key_id, len(plain) + OVERHEAD)
    assert sealed.sealed_sha256 == hashlib.sha256(body).hexdigest()
    assert open_bytes(KeyRing(KEY), body) == plain
    await after_ack()  # an inline body has no blob to delete: a no-op


async def test_a_blob_body_is_sealed_into_a_sealed_blob_and_the_plaintext_deleted(
    rig: Rig,
) -> None:
    plain = os.urandom(20_000)
    inst = await put_ingest_blob(rig, instance(plain), plain)
    after_ack = await rig.encryptor.handle(rig.deliver(ingest_message(inst, b"")))
    sealed, body = await rig.next_sealed()
    assert sealed.body is BodyKind.BLOB
    assert sealed.blob.startswith(f"{messages.SEALED_BLOB_PREFIX}.{inst.ref}.")
    assert open_bytes(KeyRing(KEY), body) == plain
    assert await rig.blobs(subjects.INGEST_BLOB_BUCKET) == 1
    await after_ack()
    assert await rig.blobs(subjects.INGEST_BLOB_BUCKET) == 0


async def test_an_inline_body_off_its_digest_is_permanent_and_publishes_nothing(rig: Rig) -> None:
    plain = os.urandom(1000)
    other = bytes(1000)  # the declared size, other bytes
    with pytest.raises(ContractViolation, match="does not match its Dicomflow-Size"):
        await rig.encryptor.handle(rig.deliver(ingest_message(instance(plain), other)))
    with pytest.raises(nats.errors.TimeoutError):
        await rig.sealed.next_msg(timeout=0.5)


async def test_a_blob_off_its_digest_is_permanent_and_leaves_no_sealed_blob(rig: Rig) -> None:
    plain = os.urandom(20_000)
    inst = await put_ingest_blob(rig, instance(plain), os.urandom(len(plain)))
    with pytest.raises(ContractViolation, match="does not match its Dicomflow-Size"):
        await rig.encryptor.handle(rig.deliver(ingest_message(inst, b"")))
    with pytest.raises(nats.errors.TimeoutError):
        await rig.sealed.next_msg(timeout=0.5)
    assert await rig.blobs(subjects.SEALED_BLOB_BUCKET) == 0


async def test_the_dead_letter_of_an_inline_body_is_it_sealed_and_signed(rig: Rig) -> None:
    plain = os.urandom(1000)
    inst = instance(plain)
    letter = await rig.encryptor.dead_letter(rig.deliver(ingest_message(inst, plain)))
    assert letter.headers[H_DLQ_BODY] == "sealed"
    sealed = messages.parse(letter.headers, sealed=True, signed=True)
    VERIFIER.verify(sealed)
    VERIFIER.check_digest(sealed, hashlib.sha256(letter.data).hexdigest())
    assert open_bytes(KeyRing(KEY), letter.data) == plain
    assert letter.note == f"body sealed under master key {KEY.key_id}"


async def test_the_dead_letter_of_a_blob_names_a_sealed_blob_then_deletes_the_plaintext(
    rig: Rig,
) -> None:
    plain = os.urandom(20_000)
    inst = await put_ingest_blob(rig, instance(plain), plain)
    letter = await rig.encryptor.dead_letter(rig.deliver(ingest_message(inst, b"")))
    sealed = messages.parse(letter.headers, sealed=True, signed=True)
    assert (sealed.body, letter.data) == (BodyKind.BLOB, b"")
    with await rig.transport.open_body(ingest_message(sealed, b""), sealed) as body:
        assert open_bytes(KeyRing(KEY), body.read()) == plain
    assert letter.after is not None
    await letter.after()
    assert await rig.blobs(subjects.INGEST_BLOB_BUCKET) == 0


async def test_a_body_that_is_not_the_instance_is_dropped_from_its_dead_letter(rig: Rig) -> None:
    plain = os.urandom(1000)
    inst = instance(plain)
    letter = await rig.encryptor.dead_letter(rig.deliver(ingest_message(inst, bytes(1000))))
    assert (letter.headers[H_DLQ_BODY], letter.data) == ("dropped", b"")
    assert "does not match its Dicomflow-Size" in letter.note


async def test_a_missing_blob_is_dropped_from_its_dead_letter(rig: Rig) -> None:
    plain = os.urandom(20_000)
    inst = instance(plain).with_body(BodyKind.BLOB, blob_name(INGEST_BLOB_PREFIX, instance(plain)))
    letter = await rig.encryptor.dead_letter(rig.deliver(ingest_message(inst, b"")))
    assert (letter.headers[H_DLQ_BODY], letter.note) == (
        "dropped",
        "body not kept: its plaintext blob is missing",
    )


def count_thread_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of each function handed to a worker thread (``asyncio.to_thread``) from now."""
    hops: list[str] = []
    real = asyncio.to_thread

    async def counted(func: Callable[..., T], /, *args: object, **kwargs: object) -> T:
        hops.append(getattr(func, "__name__", repr(func)))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", counted)
    return hops


def wide_encryptor(rig: Rig) -> Encryptor:
    """An encryptor whose bodies up to the server's max_payload travel inline."""
    transport = Transport(rig.nc, rig.nc.jetstream(), publish_timeout=5.0)
    return Encryptor(transport, KeyRing(KEY), SealSigner(SIGNING), Tracing("test"))


async def test_an_inline_image_is_checked_sealed_and_hashed_in_one_worker_thread_hop(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = os.urandom(512 * 1024)  # an image: above delivery.THREAD_HASH_MIN, inline
    inst = instance(plain)
    got = rig.deliver(ingest_message(inst, plain))
    hops = count_thread_hops(monkeypatch)
    await wide_encryptor(rig).handle(got)
    assert len(hops) == 1, hops
    sealed, body = await rig.next_sealed()
    assert sealed.body is BodyKind.INLINE
    assert (sealed.sealed_size, sealed.sealed_sha256) == (
        len(plain) + OVERHEAD,
        hashlib.sha256(body).hexdigest(),
    )
    assert open_bytes(KeyRing(KEY), body) == plain


async def test_an_inline_image_off_its_digest_fails_in_that_hop_and_publishes_nothing(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = os.urandom(512 * 1024)
    got = rig.deliver(ingest_message(instance(plain), os.urandom(len(plain))))
    sealed: list[int] = []
    update = Sealer.update
    monkeypatch.setattr(
        Sealer, "update", lambda self, data: sealed.append(len(data)) or update(self, data)
    )
    with pytest.raises(ContractViolation, match="does not match its Dicomflow-Size"):
        await wide_encryptor(rig).handle(got)
    assert sealed == []  # the check came before any sealing
    assert got.body.failed_check
    with pytest.raises(nats.errors.TimeoutError):
        await rig.sealed.next_msg(timeout=0.5)
