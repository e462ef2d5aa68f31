"""The store-writer stage: a ``StageSpec`` (``spec``) and its handler (``StoreWriter``).

For each SEALED delivery, keyed by SOP Instance UID:

0. Trust it only if a trusted encryptor signing key signed its headers and the SHA-256
   of its sealed body, and the body to be written has that digest (``sealsign``);
   anything else is dead-lettered before the index or storage is touched. The store-writer
   holds no master key: the signature is what stands for the GCM tag and the key id it
   cannot check. A blob body is hashed as it is copied into the private spool file the
   upload then reads, so the digest is of the bytes uploaded and nothing is written
   (nor deleted again) when it differs. An inline body's signature and digest are
   checked in one worker-thread hop, the signature first.
1. Look the instance up in the index.
   - Stored with the same plaintext digest: nothing to write (a redelivery or a resend);
     the ``dicom.stored`` event is published again (de-duplicated by its message id)
     in case the earlier attempt crashed before it.
   - Stored or pending with a different digest: the duplicate policy decides.
     ``reject`` raises DuplicateConflict (dead-lettered with the reason: recorded, and
     never a silent overwrite); ``keep-both`` stores it beside the first under a key of
     its own; ``overwrite`` replaces it and records the digest it replaced.
   - Absent: a ``pending`` record is created first (create-if-absent).
2. Write the object. A fresh name is written create-if-absent; an object already there
   that the index does not know is compared byte for byte and never overwritten.
   A ``pending`` record for the same digest means an earlier attempt of this same
   plaintext may have written it, whole or (a store that died mid-upload) in part, and
   perhaps sealed under another data key or master key: it is written again, and the
   record then names the key id and size of the object written now.
3. Mark the record ``stored``, publish ``dicom.stored``, then ack.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import IO, TypeVar

from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.messages import BodyKind, Instance
from dicomflow.shared.crypto.envelope import OVERHEAD
from dicomflow.shared.crypto.keyload import load_verifier
from dicomflow.shared.crypto.sealsign import SealVerifier
from dicomflow.shared.errors import BrokerUnavailable, DuplicateConflict
from dicomflow.shared.nats import hybridtopology
from dicomflow.shared.nats.errormap import nats_errors
from dicomflow.shared.nats.transport import BlobMissing, Transport, sweep_sealed_spools
from dicomflow.shared.settings import StorageSettings
from dicomflow.shared.stage import bootstrap, delivery
from dicomflow.shared.stage.bootstrap import Wiring
from dicomflow.shared.stage.delivery import AfterAck, Delivery
from dicomflow.shared.stage.spec import Parts, StageSpec
from dicomflow.shared.storage import objectstore
from dicomflow.shared.storage.index import Conflict, Index, Record, State
from dicomflow.shared.storage.layout import Layout, object_key
from dicomflow.shared.storage.objectstore import ObjectExists, ObjectStore
from dicomflow.shared.telemetry.bundle import Telemetry
from dicomflow.shared.telemetry.metrics import Metrics
from dicomflow.store_writer.settings import DuplicatePolicy, StoreWriterSettings
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

T = TypeVar("T")

STAGE = "store-writer"


class StoreWriter:
    def __init__(
        self,
        js: JetStreamContext,
        transport: Transport,
        index: Index,
        store: ObjectStore,
        storage_settings: StorageSettings,
        policy: DuplicatePolicy,
        publish_timeout: float,
        telemetry: Telemetry,
        verifier: SealVerifier,
    ) -> None:
        self._js = js
        self._verifier = verifier
        self._transport = transport
        self._index = index
        self._store = store
        self._settings = storage_settings
        self._layout = storage_settings.layout
        self._root = storage_settings.root_path
        self._policy = policy
        self._timeout = publish_timeout
        self._metrics = telemetry.metrics
        self._tracing = telemetry.tracing
        self._metrics.storage()

    async def handle(self, delivery: Delivery[Instance]) -> AfterAck:
        instance = delivery.record
        verify = functools.partial(self._verifier.verify, instance)
        body: IO[bytes]
        try:
            if instance.body is BodyKind.INLINE:
                # One worker-thread hop: the signature, then the body's SHA-256 against
                # the signed one (SealNotTrusted if either fails); the bytes are shared.
                body = await delivery.body.apply(io.BytesIO, first=verify)
            else:
                verify()  # before a blob is fetched
                body = await delivery.body.open()  # checked against the signed digest
        except BlobMissing:
            # In the hybrid cloud the blob arrives through a source of its own, which can
            # lag behind the message's: wait for it while it may still be on its way.
            if await hybridtopology.blob_in_transit(self._js, delivery.stored_at):
                raise BlobInTransit(
                    "the blob named by the message has not arrived from its site yet "
                    "(the sealed-blob source is catching up or cut off)"
                ) from None
            raise
        with body:
            if instance.body is BodyKind.BLOB:  # inline bodies were checked on delivery
                messages.check_envelope(instance, body.read(OVERHEAD))
                body.seek(0)
            await self._store_once(instance, body)

        async def after_ack() -> None:
            await self._transport.delete_blob(instance)

        return after_ack

    async def _store_once(self, instance: Instance, body: IO[bytes]) -> None:
        index_key = instance.sop_instance_uid
        key = self._object_key(instance)
        replaced = ""
        adopted = False  # an earlier attempt's pending record of the same plaintext
        while True:  # re-decide when another writer changed the record under us
            # The common case is a new instance: try to claim the key first (one round
            # trip), and read the existing record only when that fails.
            record = self._record(instance, key, State.PENDING)
            try:
                revision = await self._index.create(index_key, record)
            except Conflict:
                found = await self._index.get(index_key)
            else:
                fresh = True
                break
            if found is None:
                continue
            existing, revision = found
            if existing.sha256 == instance.sha256:
                if existing.state is State.STORED:
                    log.info("instance already stored with identical bytes: no-op")
                    await self._emit(instance, existing)
                    return
                record, key, fresh = existing, existing.object_key, False
                adopted = True
                break
            # Same SOP Instance UID, different bytes.
            if self._policy is DuplicatePolicy.REJECT:
                raise DuplicateConflict(
                    "SOP Instance UID already stored with different content "
                    f"(stored sha256 {existing.sha256[:16]}..., "
                    f"received {instance.sha256[:16]}...); policy reject: not stored"
                )
            if self._policy is DuplicatePolicy.KEEP_BOTH:
                index_key = f"{instance.sop_instance_uid}.dup.{instance.sha256[:16]}"
                key = f"{self._object_key(instance)}.dup-{instance.sha256[:16]}"
                continue
            replaced = existing.sha256
            record = self._record(instance, key, State.PENDING, replaced=replaced)
            try:
                revision = await self._index.update(index_key, record, revision)
            except Conflict:
                continue
            fresh = False
            log.warning("overwriting instance with different bytes (policy overwrite)")
            break

        await self._write(key, body, instance.sealed_size or 0, instance.sealed_sha256, fresh=fresh)
        if adopted:  # the record describes the object written now
            record = replace(
                record, key_id=instance.key_id or 0, sealed_size=instance.sealed_size or 0
            )
        done = record.stored(datetime.now(UTC).isoformat(timespec="milliseconds"))
        try:
            await self._index.update(index_key, done, revision)
        except Conflict:
            # A concurrent delivery of the same plaintext finished first: same result.
            log.info("index already updated by a concurrent delivery")
        await self._emit(instance, done)

    async def _write(
        self, key: str, body: IO[bytes], size: int, sha256: str, *, fresh: bool
    ) -> None:
        try:
            await _timed(
                self._metrics,
                "put",
                lambda: objectstore.put(
                    self._store, key, body, size=size, create=fresh, settings=self._settings
                ),
            )
        except ObjectExists:
            # The body was checked against the signed digest: that is its SHA-256.
            theirs = await _timed(
                self._metrics, "compare", lambda: objectstore.sha256_of(self._store, key)
            )
            if sha256 != theirs:
                raise DuplicateConflict(
                    "an object the index does not know already exists at the target key "
                    "with other bytes; it was not overwritten"
                ) from None
            # An earlier attempt may have died between writing it and syncing it.
            await objectstore.make_durable(self._settings, key)
            log.info("object already present with identical bytes")

    def _object_key(self, instance: Instance) -> str:
        return object_key(
            self._layout,
            self._root,
            sop_instance_uid=instance.sop_instance_uid,
            study_uid=instance.study_uid,
            series_uid=instance.series_uid,
            encrypted=True,
        )

    @staticmethod
    def _record(instance: Instance, key: str, state: State, replaced: str = "") -> Record:
        return Record(
            sop_instance_uid=instance.sop_instance_uid,
            sop_class_uid=instance.sop_class_uid,
            study_uid=instance.study_uid,
            series_uid=instance.series_uid,
            modality=instance.modality,
            transfer_syntax=instance.transfer_syntax,
            calling_ae=instance.calling_ae,
            called_ae=instance.called_ae,
            object_key=key,
            size=instance.size,
            sealed_size=instance.sealed_size or 0,
            sha256=instance.sha256,
            key_id=instance.key_id or 0,
            state=state,
            replaced_sha256=replaced,
        )

    async def _emit(self, instance: Instance, record: Record) -> None:
        event = instance.with_body(messages.BodyKind.INLINE).unsigned()
        headers = self._tracing.propagate(event).headers()
        headers[messages.H_MSG_ID] = f"stored:{record.object_key}:{instance.sha256}"
        headers[messages.H_OBJECT_KEY] = record.object_key
        headers[messages.H_SEALED_BODY] = instance.body.value
        with nats_errors("could not publish the dicom.stored event"):
            await self._js.publish(
                subjects.stored_subject(instance.called_ae, instance.calling_ae),
                b"",
                headers=headers,
                timeout=self._timeout,
            )


async def _timed(metrics: Metrics, operation: str, request: Callable[[], Awaitable[T]]) -> T:
    """Run one storage request, observing its latency and whether it failed.

    "Already exists" and "not found" are answers, not failures of the store.
    """
    start = time.perf_counter()
    outcome = "ok"
    try:
        return await request()
    except (ObjectExists, FileNotFoundError):
        raise
    except Exception:
        outcome = "error"
        raise
    finally:
        metrics.storage_seconds.labels(operation, outcome).observe(time.perf_counter() - start)


class BlobInTransit(BrokerUnavailable):
    """A sealed blob is still on its way from the site (ridden out as an outage)."""


def spec(settings: StoreWriterSettings) -> StageSpec[Instance]:
    """The store-writer: SEALED in, objects, index records and ``dicom.stored`` out. It
    sweeps no blobs: finding the references means reading INGEST and the DLQ, which
    it may not (``blobsweeper``)."""
    verifier = load_verifier(settings.encryption)  # refuses to start without a trusted key
    store = objectstore.build_store(settings.storage)
    if settings.storage.layout is Layout.LEGACY:
        log.info("legacy layout: object names carry no extension, as the Orthanc plugins write")

    async def build(wiring: Wiring) -> Parts[Instance]:
        if removed := sweep_sealed_spools(settings.spool_dir):
            log.info("removed %d sealed spool file(s) a stopped store-writer left", removed)
        writer = StoreWriter(
            wiring.js,
            wiring.transport,
            await Index.open(wiring.js),
            store,
            settings.storage,
            settings.duplicate_policy,
            settings.nats.publish_timeout,
            wiring.telemetry,
            verifier,
        )
        log.info(
            "store-writer ready: backend %s, layout %s, trusted signing keys %s",
            settings.storage.backend,
            settings.storage.layout,
            ", ".join(verifier.signers),
        )
        return Parts(delivery.concurrently(writer.handle))

    return StageSpec(
        name=STAGE,
        stream=subjects.SEALED_STREAM,
        durable=subjects.STORE_WRITER_DURABLE,
        decoder=delivery.sealed,
        build=build,
        readiness=lambda readiness: readiness.add_storage(store, settings.storage.root_path),
        batch=None,  # consumer.batch
    )


async def serve(settings: StoreWriterSettings, stop: asyncio.Event, telemetry: Telemetry) -> None:
    await bootstrap.serve(spec(settings), settings, stop, telemetry)
