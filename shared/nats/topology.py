"""Creates the JetStream topology idempotently: every service calls ``ensure`` at start.

With least-privilege NATS users (``nats.manage_topology = false``) a service may not
create or alter streams: ``ensure`` then only checks that they exist, and the admin
user creates them (`dicomflow topology`, a Kubernetes Job, or `dicomflow up`).

Retention is chosen per stream:
- INGEST holds plaintext, so it is a work queue (a message is gone once the encryptor
  acks it) and bounded with discard-new: when full, publishes fail and the gateway
  answers 0xA700 instead of Success.
- SEALED has interest retention: a message stays until every consumer acked it, the
  store writer's and, when relay rules are configured, the scu-gateway's ``scu-relay``
  (``routing``). A stream with interest retention drops a message published while it
  has no consumer at all, so the store writer's durable is created here, with the
  stream, before any encryptor can publish; ``verify`` refuses to start a stage while
  it is missing. SEALED holds sealed bytes only. A SEALED stream made as a work queue
  by an earlier dicomflow cannot be switched in place (JetStream refuses): ``ensure``
  with ``migrate`` (``dicomflow topology`` and ``dicomflow up``, which run before the
  stages) re-creates it when it is empty, and says how to empty it when it is not.
- EVENTS keeps ``dicom.stored`` events for a week for downstream consumers.
- DLQ keeps dead-lettered messages (with their reason) until an operator replays or
  purges them, for at most ``nats.dlq_max_age`` (30 days), within ``nats.dlq_max_bytes``
  with discard-new: a full DLQ refuses a new letter, and the stage keeps that message
  (riding the refusal out as an outage, its input backing up) rather than have
  JetStream drop the oldest letters unseen. No plaintext rests in it: the encryptor
  seals what it dead-letters (``consumer.Letter``). ``ensure`` updates an existing DLQ
  stream to these bounds in place.
- DELIVERY holds scu_gateway delivery requests (headers only, one per instance and
  destination) until the destination's consumer acks them: a work queue whose
  consumers each filter one destination's subject.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

from dicomflow.shared.contracts import subjects
from dicomflow.shared.errors import BrokerUnavailable, ConfigError
from dicomflow.shared.nats import errormap, zones
from dicomflow.shared.nats.zones import Zone
from dicomflow.shared.settings import ConsumerSettings, NatsSettings
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

log = logging.getLogger(__name__)

WEEK = 7 * 24 * 3600.0
KEYS_MAX_BYTES = 1024 * 1024  # key check values: some 100 bytes per key id
STREAM_NAME_IN_USE = 10058  # JetStream: "stream name already in use with a different config"


def stream_configs(nats: NatsSettings) -> list[StreamConfig]:
    def stream(name: str, prefix: str, retention: RetentionPolicy, **limits: Any) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=[f"{prefix}.>"],
            retention=retention,
            storage=StorageType.FILE,
            num_replicas=nats.stream_replicas,
            duplicate_window=nats.duplicate_window,
            **limits,
        )

    bounded = {"max_bytes": nats.ingest_max_bytes, "discard": DiscardPolicy.NEW}
    return [
        stream(
            subjects.INGEST_STREAM, subjects.INGEST_PREFIX, RetentionPolicy.WORK_QUEUE, **bounded
        ),
        stream(subjects.SEALED_STREAM, subjects.SEALED_PREFIX, RetentionPolicy.INTEREST, **bounded),
        stream(
            subjects.EVENTS_STREAM, subjects.STORED_PREFIX, RetentionPolicy.LIMITS, max_age=WEEK
        ),
        stream(subjects.DELIVERY_STREAM, subjects.DELIVER_PREFIX, RetentionPolicy.WORK_QUEUE),
        stream(
            subjects.DLQ_STREAM,
            subjects.DLQ_PREFIX,
            RetentionPolicy.LIMITS,
            max_age=nats.dlq_max_age,
            max_bytes=nats.dlq_max_bytes,
            discard=DiscardPolicy.NEW,
        ),
    ]


def consumer_config(durable: str, consumer: ConsumerSettings) -> ConsumerConfig:
    """A durable pull consumer with explicit acks and a finite MaxDeliver.

    The consumer itself dead-letters on the last attempt (see ``consumer.py``), so
    MaxDeliver is a backstop, never the place where a message silently stops.
    """
    return ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=consumer.ack_wait,
        max_deliver=consumer.max_deliver,
        max_ack_pending=max(consumer.concurrency * 4, 16),
    )


class TopologyMissing(ConfigError):
    """A stream or bucket does not exist and this user may not create it."""


class TopologyOutdated(ConfigError):
    """A stream was made by an earlier dicomflow with settings that cannot be changed
    in place."""


SETUP_DEADLINE = 60.0


async def ensure(js: JetStreamContext, nats: NatsSettings, *, migrate: bool = False) -> None:
    """Create or update streams and buckets; safe to run from every replica at once.

    ``migrate``: re-create an empty stream whose retention changed since an earlier
    version (only where no stage runs yet: the admin's `dicomflow topology`, `up`).

    Without ``nats.manage_topology`` only verifies that they all exist. A JetStream that
    does not answer yet (a cluster still electing its meta leader, a node restarting) is
    waited for, up to ``SETUP_DEADLINE`` seconds, instead of failing the stage's start.
    """
    deadline = time.monotonic() + SETUP_DEADLINE
    delay = 0.5
    while True:
        try:
            await _ensure_once(js, nats, migrate)
        except errormap.NOT_ANSWERING as exc:
            if time.monotonic() + delay > deadline:
                raise BrokerUnavailable(
                    f"JetStream did not complete the topology setup within {SETUP_DEADLINE:g} s "
                    f"({type(exc).__name__}); is JetStream enabled, and does the cluster have "
                    "a quorum?"
                ) from exc
            log.warning("JetStream not answering the topology setup (%r); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
        else:
            return


async def _ensure_once(js: JetStreamContext, nats: NatsSettings, migrate: bool) -> None:
    if not nats.manage_topology:
        await verify(js, nats.zone)
        return
    for config in stream_configs(nats):
        await _ensure_stream(js, config, migrate)
    await _ensure_interest(js)
    await _ensure_kv(js, nats)
    await _ensure_stream(js, keys_config(nats), migrate)
    for bucket in subjects.BLOB_BUCKETS:
        await _ensure_blobs(js, nats, bucket)


async def verify(js: JetStreamContext, zone: Zone = Zone.SINGLE) -> None:
    """Raise TopologyMissing naming every stream or bucket of ``zone`` that does not exist.

    Looked up by name (``STREAM.NAMES``, which every service user may ask), not by
    ``STREAM.INFO``: that one is granted per stream to the users that need it, because
    with a subject filter it lists a stream's subjects (the index's are SOP Instance
    UIDs)."""
    held = _stream_subjects()
    missing = [name for name in zones.streams(zone) if not await _named(js, name, held[name])]
    if not missing:
        missing = await _missing_sealed_consumer(js, zone)
    if missing:
        raise TopologyMissing(
            f"JetStream streams/buckets missing: {', '.join(missing)}; this service may not "
            "create them (nats.manage_topology = false): run `dicomflow topology` with the "
            "admin credentials first"
        )


async def _missing_sealed_consumer(js: JetStreamContext, zone: Zone) -> list[str]:
    """SEALED keeps nothing without a consumer (interest retention): the store writer's
    durable, or at an edge the uplink durable. The edge's plaintext side has no SEALED."""
    if zone is Zone.EDGE_LOCAL:
        return []
    if zone is Zone.EDGE_SEALED:
        if (await js.stream_info(subjects.SEALED_STREAM)).state.consumer_count:
            return []
        return [f"the uplink consumer of {subjects.SEALED_STREAM}"]
    if await consumer_exists(js, subjects.SEALED_STREAM, subjects.STORE_WRITER_DURABLE):
        return []
    return [f"the {subjects.STORE_WRITER_DURABLE} consumer of {subjects.SEALED_STREAM}"]


async def ensure_consumer(
    js: JetStreamContext, stream: str, durable: str, consumer: ConsumerSettings
) -> None:
    await js.add_consumer(stream, consumer_config(durable, consumer))


async def ensure_filtered_consumer(
    js: JetStreamContext,
    stream: str,
    durable: str,
    filter_subject: str,
    consumer: ConsumerSettings,
) -> None:
    """A durable consumer of one subject filter. The server creates it, or updates it in
    place when its settings (max_deliver, ack_wait...) changed since the last start."""
    config = consumer_config(durable, consumer)
    config.filter_subject = filter_subject
    await js.add_consumer(stream, config)


async def _ensure_interest(js: JetStreamContext) -> None:
    """The store writer's durable on SEALED, made before anything is published there:
    an interest stream keeps a message only for the consumers that exist when it
    arrives. Made with default settings; the store writer updates them at its start."""
    if not await consumer_exists(js, subjects.SEALED_STREAM, subjects.STORE_WRITER_DURABLE):
        await js.add_consumer(
            subjects.SEALED_STREAM,
            consumer_config(subjects.STORE_WRITER_DURABLE, ConsumerSettings()),
        )
        log.info(
            "created the %s consumer of %s", subjects.STORE_WRITER_DURABLE, subjects.SEALED_STREAM
        )


async def consumer_exists(js: JetStreamContext, stream: str, durable: str) -> bool:
    try:
        await js.consumer_info(stream, durable)
    except NotFoundError:
        return False
    return True


async def _ensure_stream(js: JetStreamContext, config: StreamConfig, migrate: bool) -> None:
    name = config.name or ""
    if await stream_exists(js, name):
        current = (await js.stream_info(name)).config.retention
        if current != config.retention:
            await _recreate(js, config, migrate)
            return
        await js.update_stream(config)
        return
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Another replica created it between our look-up and our add.
        await js.update_stream(config)
    else:
        log.info("created stream %s", config.name)


async def _recreate(js: JetStreamContext, config: StreamConfig, migrate: bool) -> None:
    """Re-create a stream whose retention must change, if it is empty and ``migrate``."""
    name = config.name or ""
    info = await js.stream_info(name)
    was = getattr(info.config.retention, "value", info.config.retention)
    wanted = getattr(config.retention, "value", config.retention)
    if info.state.messages:
        raise TopologyOutdated(
            f"stream {name} has {was} retention from an earlier dicomflow and holds "
            f"{info.state.messages} message(s); this version needs {wanted} retention, "
            "which JetStream cannot switch in place. Let the earlier version's stages "
            "drain it (stop the scp-gateway and encryptor; the store writer empties it), "
            "then run `dicomflow topology`"
        )
    if not migrate:
        raise TopologyOutdated(
            f"stream {name} has {was} retention from an earlier dicomflow; this version "
            f"needs {wanted}. It is empty: run `dicomflow topology` (or `dicomflow up`) "
            "once, with no stage running, to re-create it"
        )
    await js.delete_stream(name)
    await js.add_stream(config)
    log.warning("re-created the empty stream %s with %s retention (was %s)", name, wanted, was)


async def stream_exists(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except NotFoundError:
        return False
    return True


async def _named(js: JetStreamContext, name: str, subject: str) -> bool:
    try:
        return await js.find_stream_name_by_subject(subject) == name
    except NotFoundError:
        return False


async def _ensure_kv(js: JetStreamContext, nats: NatsSettings) -> None:
    # The server checks storage reservations before it notices that an identical
    # stream exists, so buckets are looked up first rather than re-created.
    stream = f"KV_{subjects.INDEX_BUCKET}"
    if not await stream_exists(js, stream):
        with _made_meanwhile():
            await js.create_key_value(
                KeyValueConfig(
                    bucket=subjects.INDEX_BUCKET,
                    history=5,
                    storage=StorageType.FILE,
                    replicas=nats.stream_replicas,
                )
            )
    await _refuse_rollups(js, stream)


@contextlib.contextmanager
def _made_meanwhile() -> Iterator[None]:
    """A bucket create that lost a race: another stage starting at the same moment made
    the bucket between our look-up and our create, and already made it refuse rollups, so
    ours (as nats-py creates buckets, allowing them) differs from what is there. That is
    the bucket existing; ``_refuse_rollups`` then finds it as it should be."""
    try:
        yield
    except BadRequestError as exc:
        if exc.err_code != STREAM_NAME_IN_USE:
            raise


async def _refuse_rollups(js: JetStreamContext, stream: str) -> None:
    """Make ``stream`` refuse ``Nats-Rollup`` headers (nats-py creates buckets allowing
    them): with ``Nats-Rollup: all`` one publish by any user allowed to write a key
    would erase the whole bucket. KeyValue create/update/get/delete do not use them.
    Changed in place on a stream made by an earlier version."""
    config = (await js.stream_info(stream)).config
    if config.allow_rollup_hdrs:
        config.allow_rollup_hdrs = False
        await js.update_stream(config)
        log.info("stream %s now refuses rollup headers", stream)


def keys_config(nats: NatsSettings) -> StreamConfig:
    """The key check values (``keycheck``): a KV bucket whose keys are written once.

    One message per key (``max_msgs_per_subject``), and discard-new per subject: the
    server refuses a second write of a key id, whether create, put, update or delete, and
    from any user, so a value once recorded cannot be replaced through NATS (only an
    admin purge of that subject removes it)."""
    bucket = subjects.KEYS_BUCKET
    return StreamConfig(
        name=f"KV_{bucket}",
        subjects=[f"$KV.{bucket}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=nats.stream_replicas,
        max_msgs_per_subject=1,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        allow_direct=True,
        allow_rollup_hdrs=False,
        deny_delete=True,
        max_bytes=KEYS_MAX_BYTES,
    )


async def _ensure_blobs(js: JetStreamContext, nats: NatsSettings, bucket: str) -> None:
    """A blob bucket, refusing rollups: the plaintext one holds instances already
    answered Success, which one ``Nats-Rollup: all`` metadata publish by its putter
    would erase. Puts write metadata without a rollup header (``transport``)."""
    stream = subjects.blob_stream(bucket)
    if not await stream_exists(js, stream):
        with _made_meanwhile():
            await js.add_stream(blob_stream_config(nats, bucket))
    await _refuse_rollups(js, stream)  # a bucket made by an earlier version


def blob_stream_config(nats: NatsSettings, bucket: str) -> StreamConfig:
    """The stream of a blob bucket: what nats-py's ``create_object_store`` makes, but
    refusing rollups from the start. Made so, a new bucket needs no update afterwards;
    every stage starting at once on a fresh R3 cluster updated it in place, and once the
    updates timed out for the whole setup deadline."""
    return StreamConfig(
        name=subjects.blob_stream(bucket),
        subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        max_bytes=nats.blob_max_bytes or -1,
        max_consumers=0,
        storage=StorageType.FILE,
        num_replicas=nats.stream_replicas,
        discard=DiscardPolicy.NEW,
        allow_rollup_hdrs=False,
        allow_direct=True,
    )


def stream_names() -> Sequence[str]:
    return (
        subjects.INGEST_STREAM,
        subjects.SEALED_STREAM,
        subjects.EVENTS_STREAM,
        subjects.DELIVERY_STREAM,
        subjects.DLQ_STREAM,
    )


def all_stream_names() -> Sequence[str]:
    """Every stream of the topology, buckets' streams included."""
    return tuple(_stream_subjects())


def _stream_subjects() -> dict[str, str]:
    """Every stream of the topology, with a subject it alone holds."""
    prefixes = {
        subjects.INGEST_STREAM: subjects.INGEST_PREFIX,
        subjects.SEALED_STREAM: subjects.SEALED_PREFIX,
        subjects.EVENTS_STREAM: subjects.STORED_PREFIX,
        subjects.DELIVERY_STREAM: subjects.DELIVER_PREFIX,
        subjects.DLQ_STREAM: subjects.DLQ_PREFIX,
    }
    return {
        **{name: f"{prefixes[name]}.>" for name in stream_names()},
        **{f"KV_{b}": f"$KV.{b}.>" for b in (subjects.INDEX_BUCKET, subjects.KEYS_BUCKET)},
        **{subjects.blob_stream(b): f"$O.{b}.M.>" for b in subjects.BLOB_BUCKETS},
    }


# Public entry points for the hybrid topology (``hybridtopology``), which lays the same
# streams out over the accounts of an edge and the cloud.
async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create ``config``'s stream, or update it in place (re-created if empty and its
    retention changed)."""
    await _ensure_stream(js, config, True)


async def ensure_index(js: JetStreamContext, nats: NatsSettings) -> None:
    await _ensure_kv(js, nats)


async def ensure_blob_bucket(js: JetStreamContext, nats: NatsSettings, bucket: str) -> None:
    await _ensure_blobs(js, nats, bucket)
