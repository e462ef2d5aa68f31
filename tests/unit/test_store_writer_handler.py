"""The store-writer's handler on the typed seam, without a process: every duplicate
policy, the same-plaintext no-op, the pending re-seal, and the digest check.

Storage is obstore's MemoryStore; the index KV and the ``dicom.stored`` events are on a
real nats-server. Deliveries are decoded as the consumer decodes them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import nats
import obstore
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.crypto.envelope import key_id_of, open_bytes, seal
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey
from dicomflow.shared.crypto.sealsign import SealSigner, SealVerifier
from dicomflow.shared.errors import DuplicateConflict, SealNotTrusted
from dicomflow.shared.nats import topology
from dicomflow.shared.nats.transport import Transport
from dicomflow.shared.settings import NatsSettings, StorageSettings
from dicomflow.shared.stage import delivery
from dicomflow.shared.storage import objectstore
from dicomflow.shared.storage.index import Index, State
from dicomflow.shared.storage.layout import Layout, object_key
from dicomflow.shared.telemetry.bundle import Telemetry
from dicomflow.store_writer.service import StoreWriter
from dicomflow.store_writer.settings import DuplicatePolicy
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from obstore.store import MemoryStore, ObjectStore

from dicomflow.embedded.natsserver import NatsServer
from support.fsyncs import record_fsyncs
from support.stage import instance, sealed_message

KEY = MasterKey(1, os.urandom(32))
NEW_KEY = MasterKey(2, os.urandom(32))
UID = "1.2.826.0.1.3680043.8.498.1"


@dataclass
class Rig:
    nc: Client
    transport: Transport
    index: Index
    store: ObjectStore
    events: Subscription

    def writer(
        self, policy: DuplicatePolicy, settings: StorageSettings | None = None
    ) -> StoreWriter:
        return StoreWriter(
            self.nc.jetstream(),
            self.transport,
            self.index,
            self.store,
            settings or StorageSettings(),
            policy,
            5.0,
            Telemetry.create("test"),
            SealVerifier([SIGNER_KEY.public_key()]),
        )

    async def write(self, policy: DuplicatePolicy, plain: bytes, key: MasterKey = KEY) -> None:
        inst, body = sealed(plain, key)
        got = delivery.deliver(delivery.sealed(self.transport), sealed_message(inst, body))
        await self.writer(policy).handle(got)

    def object(self, key: str) -> bytes:
        return bytes(obstore.get(self.store, key).bytes())

    def keys(self) -> list[str]:
        return sorted(item["path"] for batch in obstore.list(self.store) for item in batch)

    async def event(self) -> dict[str, str]:
        msg = await self.events.next_msg(timeout=5)
        return dict(msg.headers or {})


SIGNER_KEY = Ed25519PrivateKey.generate()
SIGNER = SealSigner(SIGNER_KEY)
KEY_OF_UID = object_key(
    Layout.FLAT,
    "",
    sop_instance_uid=UID,
    study_uid=instance(b"x").study_uid,
    series_uid=instance(b"x").series_uid,
    encrypted=True,
)


def sealed(plain: bytes, key: MasterKey = KEY) -> tuple[Instance, bytes]:
    """The SEALED message the encryptor would publish for ``plain``: headers, body."""
    body = seal(key, plain)
    inst = instance(plain, UID).sealed(key.key_id, len(body), hashlib.sha256(body).hexdigest())
    return SIGNER.sign(inst), body


@pytest.fixture
async def rig(nats_server: NatsServer) -> AsyncIterator[Rig]:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await topology.ensure(js, NatsSettings(servers=[nats_server.url]))
    events = await nc.subscribe(f"{subjects.STORED_PREFIX}.>")
    try:
        yield Rig(
            nc, Transport(nc, js, publish_timeout=5.0), await Index.open(js), MemoryStore(), events
        )
    finally:
        await nc.close()


async def test_a_new_instance_is_written_indexed_and_announced(rig: Rig) -> None:
    plain = os.urandom(500)
    await rig.write(DuplicatePolicy.REJECT, plain)
    assert open_bytes(KeyRing(KEY), rig.object(KEY_OF_UID)) == plain
    found = await rig.index.get(UID)
    assert found is not None
    record, _ = found
    assert (record.state, record.object_key, record.key_id) == (State.STORED, KEY_OF_UID, 1)
    event = await rig.event()
    assert event[messages.H_OBJECT_KEY] == KEY_OF_UID
    assert event[messages.H_SEALED_BODY] == "inline"
    assert messages.H_SIGNATURE not in event  # events after storage carry no signature


@pytest.mark.parametrize("policy", list(DuplicatePolicy))
async def test_the_same_plaintext_again_is_a_no_op_that_announces_again(
    rig: Rig, policy: DuplicatePolicy
) -> None:
    plain = os.urandom(500)
    await rig.write(policy, plain)
    first = rig.object(KEY_OF_UID)
    await rig.event()
    await rig.write(policy, plain)  # sealed again: other bytes, same plaintext
    assert rig.object(KEY_OF_UID) == first
    assert rig.keys() == [KEY_OF_UID]
    assert (await rig.event())[messages.H_OBJECT_KEY] == KEY_OF_UID


async def test_reject_dead_letters_other_bytes_and_keeps_the_first(rig: Rig) -> None:
    plain, other = os.urandom(500), os.urandom(500)
    await rig.write(DuplicatePolicy.REJECT, plain)
    with pytest.raises(DuplicateConflict, match="policy reject: not stored"):
        await rig.write(DuplicatePolicy.REJECT, other)
    assert open_bytes(KeyRing(KEY), rig.object(KEY_OF_UID)) == plain
    assert rig.keys() == [KEY_OF_UID]
    found = await rig.index.get(UID)
    assert found is not None
    assert found[0].sha256 == hashlib.sha256(plain).hexdigest()


async def test_keep_both_stores_other_bytes_beside_the_first(rig: Rig) -> None:
    plain, other = os.urandom(500), os.urandom(500)
    await rig.write(DuplicatePolicy.KEEP_BOTH, plain)
    await rig.write(DuplicatePolicy.KEEP_BOTH, other)
    digest = hashlib.sha256(other).hexdigest()
    beside = f"{KEY_OF_UID}.dup-{digest[:16]}"
    assert rig.keys() == sorted([KEY_OF_UID, beside])
    assert open_bytes(KeyRing(KEY), rig.object(KEY_OF_UID)) == plain
    assert open_bytes(KeyRing(KEY), rig.object(beside)) == other
    first, dup = await rig.index.get(UID), await rig.index.get(f"{UID}.dup.{digest[:16]}")
    assert first is not None and dup is not None
    assert first[0].sha256 == hashlib.sha256(plain).hexdigest()
    assert (dup[0].sha256, dup[0].object_key, dup[0].state) == (digest, beside, State.STORED)
    await rig.event()
    assert (await rig.event())[messages.H_OBJECT_KEY] == beside


async def test_overwrite_replaces_the_object_and_records_what_it_replaced(rig: Rig) -> None:
    plain, other = os.urandom(500), os.urandom(500)
    await rig.write(DuplicatePolicy.OVERWRITE, plain)
    await rig.write(DuplicatePolicy.OVERWRITE, other)
    assert rig.keys() == [KEY_OF_UID]
    assert open_bytes(KeyRing(KEY), rig.object(KEY_OF_UID)) == other
    found = await rig.index.get(UID)
    assert found is not None
    record = found[0]
    assert record.sha256 == hashlib.sha256(other).hexdigest()
    assert record.replaced_sha256 == hashlib.sha256(plain).hexdigest()
    assert record.state is State.STORED


async def test_a_pending_instance_sealed_again_is_rewritten_under_the_new_key(rig: Rig) -> None:
    """An earlier attempt wrote part of the object and died before marking it stored;
    another seal of the same plaintext under another master key writes it again, and
    the record names the key of the object written now."""
    plain = os.urandom(500)
    earlier, earlier_body = sealed(plain, KEY)
    writer = rig.writer(DuplicatePolicy.REJECT)
    await rig.index.create(UID, writer._record(earlier, KEY_OF_UID, State.PENDING))
    obstore.put(rig.store, KEY_OF_UID, earlier_body[:100])  # died mid-upload
    await rig.write(DuplicatePolicy.REJECT, plain, NEW_KEY)
    now = rig.object(KEY_OF_UID)
    assert key_id_of(now) == NEW_KEY.key_id
    assert open_bytes(KeyRing(NEW_KEY), now) == plain
    found = await rig.index.get(UID)
    assert found is not None
    assert (found[0].state, found[0].key_id, found[0].sealed_size) == (
        State.STORED,
        NEW_KEY.key_id,
        len(now),
    )


async def test_an_unindexed_object_with_other_bytes_is_never_overwritten(rig: Rig) -> None:
    plain = os.urandom(500)
    obstore.put(rig.store, KEY_OF_UID, b"somebody else's object")
    with pytest.raises(DuplicateConflict, match="was not overwritten"):
        await rig.write(DuplicatePolicy.OVERWRITE, plain)
    assert rig.object(KEY_OF_UID) == b"somebody else's object"


async def test_an_identical_object_already_on_disk_is_fsynced_before_the_ack(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object is there with these very bytes (an attempt that died after writing it,
    perhaps before syncing it): it is taken as written only once it is fsynced."""
    settings = StorageSettings(backend="local", local_path=tmp_path)
    rig.store = objectstore.build_store(settings)
    inst, body = sealed(os.urandom(500))
    obstore.put(rig.store, KEY_OF_UID, body)
    synced = record_fsyncs(monkeypatch)
    writer = rig.writer(DuplicatePolicy.REJECT, settings)
    got = delivery.deliver(delivery.sealed(rig.transport), sealed_message(inst, body))
    await writer.handle(got)
    assert str((tmp_path / KEY_OF_UID).resolve()) in synced
    found = await rig.index.get(UID)
    assert found is not None and found[0].state is State.STORED


async def test_a_body_altered_after_sealing_is_refused_before_anything_is_written(
    rig: Rig,
) -> None:
    inst, body = sealed(os.urandom(500))
    altered = body[:-1] + bytes([body[-1] ^ 1])
    got = delivery.deliver(delivery.sealed(rig.transport), sealed_message(inst, altered))
    with pytest.raises(SealNotTrusted, match="digest check failed"):
        await rig.writer(DuplicatePolicy.REJECT).handle(got)
    assert rig.keys() == []
    assert await rig.index.get(UID) is None


@pytest.mark.parametrize(
    ("forged", "reason"), [(False, "digest check failed"), (True, "signature check failed")]
)
async def test_an_altered_inline_image_is_refused_in_order_before_anything_is_written(
    rig: Rig, forged: bool, reason: str
) -> None:
    # An image's size: signature and digest are checked in a worker thread together.
    inst, body = sealed(os.urandom(512 * 1024))
    if forged:  # headers changed after signing: the signature fails first
        inst = replace(inst, modality="MR")
    altered = body[:-1] + bytes([body[-1] ^ 1])
    got = delivery.deliver(delivery.sealed(rig.transport), sealed_message(inst, altered))
    with pytest.raises(SealNotTrusted, match=reason):
        await rig.writer(DuplicatePolicy.REJECT).handle(got)
    assert got.body.failed_check is not forged  # a forged message's body is never checked
    assert rig.keys() == []
    assert await rig.index.get(UID) is None
