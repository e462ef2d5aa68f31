"""Creates the JetStream topology idempotently: every service calls ``ensure`` at start.

Retention is chosen per stream:
- INGEST holds plaintext, so it is a work queue (a message is gone once the encryptor
  acks it) and bounded with discard-new: when full, publishes fail and the gateway
  answers 0xA700 instead of Success.
- SEALED is a work queue for the store writer.
- EVENTS keeps ``dicom.stored`` events for a week for downstream consumers.
- DLQ keeps dead-lettered messages (with their reason) until an operator acts.
- DELIVERY holds scu_gateway delivery requests (headers only, one per instance and
  destination) until the destination's consumer acks them: a work queue whose
  consumers each filter one destination's subject.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

from dicomflow.shared import subjects
from dicomflow.shared.settings import ConsumerSettings, NatsSettings

log = logging.getLogger(__name__)

WEEK = 7 * 24 * 3600.0


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
        stream(
            subjects.SEALED_STREAM, subjects.SEALED_PREFIX, RetentionPolicy.WORK_QUEUE, **bounded
        ),
        stream(
            subjects.EVENTS_STREAM, subjects.STORED_PREFIX, RetentionPolicy.LIMITS, max_age=WEEK
        ),
        stream(subjects.DELIVERY_STREAM, subjects.DELIVER_PREFIX, RetentionPolicy.WORK_QUEUE),
        stream(subjects.DLQ_STREAM, subjects.DLQ_PREFIX, RetentionPolicy.LIMITS),
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


async def ensure(js: JetStreamContext, nats: NatsSettings) -> None:
    """Create or update streams and buckets; safe to run from every replica at once."""
    for config in stream_configs(nats):
        await _ensure_stream(js, config)
    await _ensure_kv(js, nats)
    await _ensure_blobs(js, nats)


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


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    if await _exists(js, config.name or ""):
        await js.update_stream(config)
        return
    try:
        await js.add_stream(config)
    except BadRequestError:
        # Another replica created it between our look-up and our add.
        await js.update_stream(config)
    else:
        log.info("created stream %s", config.name)


async def _exists(js: JetStreamContext, stream: str) -> bool:
    try:
        await js.stream_info(stream)
    except NotFoundError:
        return False
    return True


async def _ensure_kv(js: JetStreamContext, nats: NatsSettings) -> None:
    # The server checks storage reservations before it notices that an identical
    # stream exists, so buckets are looked up first rather than re-created.
    if await _exists(js, f"KV_{subjects.INDEX_BUCKET}"):
        return
    await js.create_key_value(
        KeyValueConfig(
            bucket=subjects.INDEX_BUCKET,
            history=5,
            storage=StorageType.FILE,
            replicas=nats.stream_replicas,
        )
    )


async def _ensure_blobs(js: JetStreamContext, nats: NatsSettings) -> None:
    if await _exists(js, f"OBJ_{subjects.BLOB_BUCKET}"):
        return
    await js.create_object_store(
        subjects.BLOB_BUCKET,
        ObjectStoreConfig(
            storage=StorageType.FILE,
            replicas=nats.stream_replicas,
            max_bytes=nats.blob_max_bytes,
        ),
    )


def stream_names() -> Sequence[str]:
    return (
        subjects.INGEST_STREAM,
        subjects.SEALED_STREAM,
        subjects.EVENTS_STREAM,
        subjects.DELIVERY_STREAM,
        subjects.DLQ_STREAM,
    )
