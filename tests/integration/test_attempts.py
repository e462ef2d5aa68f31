"""Two attempts at one message never touch each other's output (real nats-server).

A message can be worked on twice: the encryptor dies (or loses its ack) after publishing
to SEALED and before acking INGEST, so the same INGEST message is sealed again under a
fresh data key; a modality resends an instance the gateway already published. Each
attempt writes a blob of its own, JetStream keeps the first attempt's message, and the
second attempt's blob is removed, so the message that survives still names the bytes it
was signed over.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import nats
import pytest
from dicomflow.encryptor.service import Encryptor
from dicomflow.encryptor.settings import EncryptorSettings
from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.messages import BodyKind, Instance
from dicomflow.shared.crypto.envelope import OVERHEAD, key_id_of, open_bytes, seal
from dicomflow.shared.crypto.keyload import load_keyring, load_signer
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey, load_master_key
from dicomflow.shared.crypto.sealsign import load_signing_key
from dicomflow.shared.nats import topology
from dicomflow.shared.nats.transport import Transport
from dicomflow.shared.settings import NatsSettings, load_settings
from dicomflow.shared.stage import delivery
from dicomflow.shared.storage.index import Index, Record, State
from dicomflow.shared.storage.layout import Layout, object_key
from dicomflow.shared.telemetry.tracing import Tracing
from nats.js.client import JetStreamContext

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import dataset_bytes, of_total_size
from support.pipeline import Pipeline

pytestmark = pytest.mark.integration

SUBJECT = subjects.sealed_subject("SCP", "SCU")
BIG = 3 * 1024 * 1024  # above the inline limit of a default nats-server (1 MiB payloads)


def _instance(body: bytes, plaintext: bytes) -> Instance:
    """A sealed instance whose sealed body is ``body`` (of plaintext ``plaintext``)."""
    return Instance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        study_uid="1.2.3",
        series_uid="1.2.3.5",
        calling_ae="SCU",
        called_ae="SCP",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=len(plaintext),
        sha256=hashlib.sha256(plaintext).hexdigest(),
    ).sealed(1, len(body), hashlib.sha256(body).hexdigest())


async def _blob_count(js: JetStreamContext, bucket: str) -> int:
    info = await js.stream_info(subjects.blob_stream(bucket), subjects_filter=f"$O.{bucket}.M.>")
    return len(info.state.subjects or {})


def test_second_attempt_of_a_blob_message_leaves_the_first_intact(
    nats_server: NatsServer,
) -> None:
    """Two seals of one plaintext, published under one message id: the message kept is
    the first, and its blob still holds the first seal (it was replaced before)."""
    plaintext = os.urandom(BIG)
    first, second = os.urandom(BIG + 86), os.urandom(BIG + 86)

    async def run() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await topology.ensure(js, NatsSettings(servers=[nats_server.url]))
            transport = Transport(nc, js, publish_timeout=5.0)
            for body in (first, second):
                await transport.publish(
                    SUBJECT,
                    _instance(body, plaintext),
                    io.BytesIO(body),
                    len(body),
                    blob_prefix=messages.SEALED_BLOB_PREFIX,
                )
            info = await js.stream_info(subjects.SEALED_STREAM)
            assert info.state.messages == 1  # the second was a duplicate
            msg = await js.get_msg(subjects.SEALED_STREAM, info.state.first_seq)
            kept = messages.parse(msg.headers, sealed=True)
            assert kept.sealed_sha256 == hashlib.sha256(first).hexdigest()
            reader, digest = await transport.open_body_hashed(msg, kept)  # type: ignore[arg-type]
            with reader:
                assert digest == kept.sealed_sha256
                assert reader.read() == first
            # the second attempt's blob is gone: only the kept message's blob remains
            assert await _blob_count(js, subjects.SEALED_BLOB_BUCKET) == 1
            assert kept.sop_instance_uid not in kept.blob  # names identify nothing
        finally:
            await nc.close()

    asyncio.run(run())


def test_resealed_blob_instance_is_stored_once_and_reads_back_identical(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The encryptor seals one INGEST message twice before acking it (as after a crash
    between its SEALED publish and its ack); the store writer, behind, then stores the
    instance from the message JetStream kept, with nothing dead-lettered."""
    pipe = Pipeline(
        tmp_path / "pipe", nats_server, {"backend": "local", "local_path": tmp_path / "o"}
    )
    big = of_total_size(tmp_path / "big.dcm", BIG, seed=3)
    pipe.start("scp-gateway")
    try:
        result = pipe.storescu([big.path])
        assert result.returncode == 0, result.output
        assert result.statuses() == ["Success"]
        asyncio.run(_seal_twice(pipe.config, nats_server.url))
        pipe.start("store-writer")
        stored = pipe.wait_stored(1, timeout=60)
        assert set(stored) == {big.sop_instance_uid}
        out = tmp_path / "back.dcm"
        got = pipe.cli("get", big.sop_instance_uid, "-o", str(out), "--config", str(pipe.config))
        assert got.returncode == 0, got.stderr
        assert dataset_bytes(out) == dataset_bytes(big.path)
        pipe.wait_drained(timeout=30)
        assert pipe.dead_letters() == []
        assert asyncio.run(_blobs_left(nats_server.url)) == {
            subjects.INGEST_BLOB_BUCKET: 0,
            subjects.SEALED_BLOB_BUCKET: 0,
        }
    finally:
        pipe.stop()


async def _seal_twice(config: Path, url: str) -> None:
    settings = load_settings(EncryptorSettings, config)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await topology.ensure_consumer(
            js, subjects.INGEST_STREAM, subjects.ENCRYPTOR_DURABLE, settings.consumer
        )
        sub = await js.pull_subscribe_bind(
            subjects.ENCRYPTOR_DURABLE, stream=subjects.INGEST_STREAM
        )
        [msg] = await sub.fetch(1, timeout=10)
        assert messages.parse(msg.headers).body is BodyKind.BLOB
        transport = Transport(nc, js, publish_timeout=5.0)
        encryptor = Encryptor(
            transport,
            load_keyring(settings.encryption),
            load_signer(settings.encryption),
            Tracing("encryptor"),
        )
        got = delivery.deliver(delivery.ingest(transport), msg)
        await encryptor.handle(got)  # published, then "died" before the ack
        after_ack = await encryptor.handle(got)  # the redelivery seals it again
        await msg.ack_sync()
        await after_ack()
    finally:
        await nc.close()


async def _blobs_left(url: str) -> dict[str, Any]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        return {bucket: await _blob_count(js, bucket) for bucket in subjects.BLOB_BUCKETS}
    finally:
        await nc.close()


def test_a_pending_instance_written_again_records_the_key_of_what_is_stored(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """A store writer died after writing an instance's object (or part of it: a store
    killed mid-upload) and before marking its ``pending`` record stored; another seal of
    the same plaintext (a resend after the duplicate window, here under another master
    key) then arrives. It is written, and the record names the key id of the object now
    stored, so `keys status` and a rotation never count it under a key it is not under."""
    objects = tmp_path / "objects"
    pipe = Pipeline(tmp_path / "pipe", nats_server, {"backend": "local", "local_path": objects})
    plaintext = os.urandom(50_000)
    earlier = seal(MasterKey(7, os.urandom(32)), plaintext)  # another master key's id
    instance = Instance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.77",
        study_uid="1.2.826.0.1.3680043.8.498.7",
        series_uid="1.2.826.0.1.3680043.8.498.78",
        calling_ae="STORESCU",
        called_ae="DICOMFLOW",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=len(plaintext),
        sha256=hashlib.sha256(plaintext).hexdigest(),
    )
    key = object_key(
        Layout.FLAT,
        "",
        sop_instance_uid=instance.sop_instance_uid,
        study_uid=instance.study_uid,
        series_uid=instance.series_uid,
        encrypted=True,
    )
    (objects / key).parent.mkdir(parents=True, exist_ok=True)
    (objects / key).write_bytes(earlier)
    asyncio.run(_pending_then_resealed(pipe, instance, key, plaintext))
    pipe.start("store-writer")
    try:
        stored = pipe.wait_stored(1, timeout=60)
        assert stored[instance.sop_instance_uid]["key_id"] == 1
        now = (objects / key).read_bytes()
        assert key_id_of(now) == 1
        assert open_bytes(KeyRing(load_master_key(1, pipe.key)), now) == plaintext
        assert pipe.dead_letters() == []
    finally:
        pipe.stop()


async def _pending_then_resealed(
    pipe: Pipeline, instance: Instance, key: str, plaintext: bytes
) -> None:
    nc = await nats.connect(pipe.nats.url)
    try:
        js = nc.jetstream()
        await topology.ensure(js, NatsSettings(servers=[pipe.nats.url]))
        index = await Index.open(js)
        pending = Record(
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            study_uid=instance.study_uid,
            series_uid=instance.series_uid,
            modality="",
            transfer_syntax=instance.transfer_syntax,
            calling_ae=instance.calling_ae,
            called_ae=instance.called_ae,
            object_key=key,
            size=instance.size,
            sealed_size=instance.size + OVERHEAD,
            sha256=instance.sha256,
            key_id=7,
            state=State.PENDING,
        )
        await index.create(instance.sop_instance_uid, pending)
        later = seal(load_master_key(1, pipe.key), plaintext)
        signer = load_signing_key(pipe.signing_key, "encryption.signing_key")
        sealed = signer.sign(instance.sealed(1, len(later), hashlib.sha256(later).hexdigest()))
        await Transport(nc, js, publish_timeout=5.0).publish(
            subjects.sealed_subject(instance.called_ae, instance.calling_ae),
            sealed,
            io.BytesIO(later),
            len(later),
            blob_prefix=messages.SEALED_BLOB_PREFIX,
        )
    finally:
        await nc.close()
