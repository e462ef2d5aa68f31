"""The JetStream topology of the hybrid edge: what each account holds, made in order.

Edge (one site): LOCAL gets INGEST, the DLQ and the plaintext blob bucket exactly as in a
single zone. EDGE gets SEALED and the sealed blob bucket, both with interest retention,
each made together with its uplink durable (a push consumer with ack policy
``flow_control`` and a 1 s heartbeat): an interest stream keeps nothing while it has no
consumer, and the site drops a sealed message only once the cloud has stored it (the
cloud's flow-control reply acknowledges it).

Downlink: the cloud's DELIVERY (work queue) has one durable ``downlink-<site>`` per site,
filtered to ``dicomflow.deliver.<site>.>`` (push, ``flow_control``); the site's DELIVERY
(work queue, in EDGE) sources it, so a request leaves the cloud only once the site has
stored it, and waits in the cloud while the site is away.

Cloud: SEALED is created *without* sources first, the store-writer's durable is added,
and only then the sources of every site: a sourced message reaching an interest stream
without a consumer is skipped, yet acknowledged to the site, so it would be lost. The
sealed blob bucket (limits retention: the store-writer deletes what it consumed)
sources each site's through the same kind of durable.

Two faults of the uplink are dealt with here:
- a blob and the message naming it travel through independent sources, so the message
  can arrive first: ``blob_in_transit`` tells the store-writer to wait for it;
- after link flaps and a crash of the leaf, messages the cloud already stored can stay
  in the edge's interest streams below the uplink durable's ack floor, filling SEALED
  until the gateway answers 0xA700: ``clear_uplinked`` purges what is below the ack
  floor of every consumer (the idea of ``Consumer._remove_acked_leftovers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable

from dicomflow.shared.contracts import subjects
from dicomflow.shared.nats import errormap, topology, zones
from dicomflow.shared.settings import ConsumerSettings, NatsSettings
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DiscardPolicy,
    ExternalStream,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamConsumerSource,
    StreamSource,
)

log = logging.getLogger(__name__)

SEALED_BLOBS = subjects.blob_stream(subjects.SEALED_BLOB_BUCKET)
UPLINK_MAX_ACK_PENDING = 1000
UPLINK_HEARTBEAT = 1.0
ACTIVE_WITHIN = 5.0  # seconds: a source heard from later than this is cut off or stalled
JANITOR_INTERVAL = 30.0


def _sealed(nats: NatsSettings, retention: RetentionPolicy, **extra: object) -> StreamConfig:
    return StreamConfig(
        name=subjects.SEALED_STREAM,
        subjects=[f"{subjects.SEALED_PREFIX}.>"],
        retention=retention,
        storage=StorageType.FILE,
        num_replicas=nats.stream_replicas,
        duplicate_window=nats.duplicate_window,
        max_bytes=nats.ingest_max_bytes,
        discard=DiscardPolicy.NEW,
        **extra,  # type: ignore[arg-type]
    )


def _sealed_blobs(nats: NatsSettings, retention: RetentionPolicy, **extra: object) -> StreamConfig:
    """The sealed bucket's stream, as ``create_object_store`` makes it, with ``retention``."""
    bucket = subjects.SEALED_BLOB_BUCKET
    return StreamConfig(
        name=SEALED_BLOBS,
        subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        retention=retention,
        storage=StorageType.FILE,
        num_replicas=nats.stream_replicas,
        max_bytes=nats.blob_max_bytes,
        discard=DiscardPolicy.NEW,
        allow_rollup_hdrs=True,
        allow_direct=True,
        **extra,  # type: ignore[arg-type]
    )


def uplink_consumer(site: str, stream: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=zones.uplink_durable(site),
        deliver_subject=zones.uplink_deliver_subject(site, stream),
        ack_policy=AckPolicy.FLOW_CONTROL,
        flow_control=True,
        idle_heartbeat=UPLINK_HEARTBEAT,
        max_ack_pending=UPLINK_MAX_ACK_PENDING,
    )


def downlink_consumer(site: str) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=zones.downlink_durable(site),
        deliver_subject=zones.downlink_deliver_subject(site),
        filter_subject=zones.downlink_filter(site),
        ack_policy=AckPolicy.FLOW_CONTROL,
        flow_control=True,
        idle_heartbeat=UPLINK_HEARTBEAT,
        max_ack_pending=UPLINK_MAX_ACK_PENDING,
    )


def edge_delivery(nats: NatsSettings, site: str) -> StreamConfig:
    """The site's DELIVERY: its own subjects, and the cloud's requests for it sourced
    through ``downlink-<site>``."""
    return StreamConfig(
        name=subjects.DELIVERY_STREAM,
        subjects=[zones.downlink_filter(site)],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        num_replicas=nats.stream_replicas,
        duplicate_window=nats.duplicate_window,
        sources=[
            StreamSource(
                name=subjects.DELIVERY_STREAM,
                external=ExternalStream(api=zones.site_api(zones.CLOUD_DOMAIN)),
                consumer=StreamConsumerSource(
                    name=zones.downlink_durable(site),
                    deliver_subject=zones.downlink_deliver_subject(site),
                ),
            )
        ],
    )


async def ensure_edge_local(js: JetStreamContext, nats: NatsSettings) -> None:
    """The edge's LOCAL account (as its admin): INGEST, DLQ, plaintext blob bucket."""
    for config in topology.stream_configs(nats):
        if config.name in (subjects.INGEST_STREAM, subjects.DLQ_STREAM):
            await topology.ensure_stream(js, config)
    await topology.ensure_blob_bucket(js, nats, subjects.INGEST_BLOB_BUCKET)
    await topology.ensure_stream(js, topology.keys_config(nats))  # the site's master keys


async def ensure_edge_sealed(js: JetStreamContext, nats: NatsSettings, site: str) -> None:
    """The edge's EDGE account (as its admin): SEALED and the sealed blob bucket, each
    with the uplink durable of ``site``, made before any encryptor can publish; DELIVERY
    sourcing the cloud's requests for ``site``."""
    for config in (
        _sealed(nats, RetentionPolicy.INTEREST),
        _sealed_blobs(nats, RetentionPolicy.INTEREST),
    ):
        await topology.ensure_stream(js, config)
        await js.add_consumer(config.name or "", uplink_consumer(site, config.name or ""))
    await topology.ensure_stream(js, edge_delivery(nats, site))


async def ensure_cloud(js: JetStreamContext, nats: NatsSettings, sites: Iterable[str]) -> None:
    """The cloud's HOSP account (as its admin), sourcing the sealed streams of ``sites``.

    Order matters (module docstring): SEALED and its store-writer durable first, the
    sources after. An existing SEALED keeps its sources until the last step sets them.
    """
    sites = sorted(sites)
    if not await topology.stream_exists(js, subjects.SEALED_STREAM):
        await topology.ensure_stream(js, _sealed(nats, RetentionPolicy.INTEREST))
    if not await topology.consumer_exists(
        js, subjects.SEALED_STREAM, subjects.STORE_WRITER_DURABLE
    ):
        await js.add_consumer(
            subjects.SEALED_STREAM,
            topology.consumer_config(subjects.STORE_WRITER_DURABLE, ConsumerSettings()),
        )
    for config in topology.stream_configs(nats):
        if config.name in (
            subjects.EVENTS_STREAM,
            subjects.DELIVERY_STREAM,
            subjects.DLQ_STREAM,
        ):
            await topology.ensure_stream(js, config)
    for site in sites:  # each site's requests wait here until its DELIVERY stored them
        await js.add_consumer(subjects.DELIVERY_STREAM, downlink_consumer(site))
    await topology.ensure_index(js, nats)
    await topology.ensure_stream(
        js, _sealed_blobs(nats, RetentionPolicy.LIMITS, sources=_sources(sites, SEALED_BLOBS))
    )
    await topology.ensure_stream(
        js,
        _sealed(nats, RetentionPolicy.INTEREST, sources=_sources(sites, subjects.SEALED_STREAM)),
    )


def _sources(sites: list[str], stream: str) -> list[StreamSource]:
    return [
        StreamSource(
            name=stream,
            external=ExternalStream(api=zones.site_api(site)),
            consumer=StreamConsumerSource(
                name=zones.uplink_durable(site),
                deliver_subject=zones.uplink_deliver_subject(site, stream),
            ),
        )
        for site in sites
    ]


async def blob_in_transit(js: JetStreamContext, arrived: float | None) -> bool:
    """Whether a blob missing from the cloud's sealed bucket may still be on its way:
    the bucket sources a site whose source has lag, an error, or was not heard from
    within ``ACTIVE_WITHIN`` seconds, or the message naming it (stored at ``arrived``,
    epoch seconds) is younger than that (the lag is learnt from the source's heartbeats).
    False where the bucket has no sources (a single zone): the blob is gone."""
    info = await js.stream_info(SEALED_BLOBS)
    sources = info.sources or []
    if not sources:
        return False
    if arrived is not None and time.time() - arrived < ACTIVE_WITHIN:
        return True
    for source in sources:
        active = source.active
        if source.lag or source.error or active is None or active < 0:
            return True
        if active / 1e9 > ACTIVE_WITHIN:  # nanoseconds since the source was last heard
            return True
    return False


async def clear_uplinked(js: JetStreamContext, streams: Iterable[str] = zones.UPLINKED) -> int:
    """Purge what every consumer of each stream has acknowledged (below the lowest ack
    floor); return about how many messages went. Only interest streams, and only while
    each has a consumer: nothing above an ack floor is touched."""
    removed = 0
    for stream in streams:
        info = await js.stream_info(stream)
        if info.config.retention != RetentionPolicy.INTEREST or not info.state.messages:
            continue
        floors = [
            c.ack_floor.stream_seq if c.ack_floor and c.ack_floor.stream_seq else 0
            async for c in _consumers(js, stream)
        ]
        if not floors:
            continue
        floor = min(floors)
        if info.state.first_seq and info.state.first_seq <= floor:
            await js.purge_stream(stream, seq=floor + 1)
            after = (await js.stream_info(stream)).state.messages
            gone = max(info.state.messages - after, 0)
            if gone:
                log.warning(
                    "removed %d message(s) of %s the cloud already has (below the uplink's "
                    "ack floor; left behind by a crash during catch-up)",
                    gone,
                    stream,
                )
            removed += gone
    return removed


async def _consumers(js: JetStreamContext, stream: str) -> AsyncIterator[ConsumerInfo]:
    """The stream's consumers, page by page (the server lists 256 at most at once)."""
    seen: set[str] = set()
    while True:
        page = await js.consumers_info(stream, offset=len(seen))
        fresh = [c for c in page if c.name not in seen]
        for consumer in fresh:
            seen.add(consumer.name)
            yield consumer
        if not fresh:
            return


async def run_janitor(js: JetStreamContext, stop: asyncio.Event) -> None:
    """``clear_uplinked`` now and every ``JANITOR_INTERVAL`` seconds until ``stop``."""
    while not stop.is_set():
        try:
            with errormap.nats_errors("uplink janitor failed"):
                await clear_uplinked(js)
        except errormap.RETRY_LATER as exc:
            log.warning("%s; will retry", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=JANITOR_INTERVAL)
