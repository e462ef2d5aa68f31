"""The JetStream topology on a real nats-server: SEALED's interest retention, the store
writer's durable made with it, and the migration of a work-queue SEALED made earlier."""

from __future__ import annotations

import asyncio
import contextlib

import nats
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.nats import topology
from dicomflow.shared.settings import NatsSettings
from nats.js.api import RetentionPolicy, StreamConfig
from nats.js.errors import NotFoundError

from dicomflow.embedded.natsserver import NatsServer

pytestmark = pytest.mark.integration

SEALED = subjects.SEALED_STREAM


async def test_sealed_keeps_messages_for_the_store_writer_from_the_start(
    nats_server: NatsServer,
) -> None:
    settings = NatsSettings(servers=[nats_server.url])
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await topology.ensure(js, settings)
        info = await js.stream_info(SEALED)
        assert info.config.retention == RetentionPolicy.INTEREST
        # Published before any stage consumed: kept, for the store writer's durable.
        await js.publish(subjects.sealed_subject("AE", "CT"), b"x")
        assert (await js.stream_info(SEALED)).state.messages == 1
        await topology.ensure(js, settings)  # idempotent
        assert (await js.stream_info(SEALED)).state.messages == 1

        # A least-privilege stage refuses to start while that durable is missing.
        await js.delete_consumer(SEALED, subjects.STORE_WRITER_DURABLE)
        verifying = settings.model_copy(update={"manage_topology": False})
        with pytest.raises(topology.TopologyMissing, match="store-writer consumer"):
            await topology.ensure(js, verifying)
    finally:
        await nc.close()


async def test_work_queue_sealed_from_an_earlier_version_is_migrated_only_when_empty(
    nats_server: NatsServer,
) -> None:
    settings = NatsSettings(servers=[nats_server.url])
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(
            StreamConfig(
                name=SEALED,
                subjects=[f"{subjects.SEALED_PREFIX}.>"],
                retention=RetentionPolicy.WORK_QUEUE,
            )
        )
        await js.publish(subjects.sealed_subject("AE", "CT"), b"x")
        # Not empty: refused, even by `dicomflow topology`; the message stays.
        with pytest.raises(topology.TopologyOutdated, match="holds 1 message"):
            await topology.ensure(js, settings, migrate=True)
        assert (await js.stream_info(SEALED)).state.messages == 1

        await js.purge_stream(SEALED)  # as the earlier store writer would drain it
        # Empty, but a stage's own start (with others possibly publishing) only says how.
        with pytest.raises(topology.TopologyOutdated, match="run `dicomflow topology`"):
            await topology.ensure(js, settings)
        assert (await js.stream_info(SEALED)).config.retention == RetentionPolicy.WORK_QUEUE

        await topology.ensure(js, settings, migrate=True)
        assert (await js.stream_info(SEALED)).config.retention == RetentionPolicy.INTEREST
        assert await js.consumer_info(SEALED, subjects.STORE_WRITER_DURABLE)
    finally:
        await nc.close()


async def test_stages_starting_at_once_all_set_up_the_buckets(nats_server: NatsServer) -> None:
    """Several stages start at the same moment on a fresh server (the fault suite starts
    two store writers): each looks the buckets up, finds none and creates them. The one
    that loses the race sees a bucket that already refuses rollups, unlike the one it
    asked for: that is the bucket existing, not a failed start."""
    settings = NatsSettings(servers=[nats_server.url])
    buckets = (f"KV_{subjects.INDEX_BUCKET}", *map(subjects.blob_stream, subjects.BLOB_BUCKETS))
    conns = [await nats.connect(nats_server.url) for _ in range(6)]
    try:
        for _ in range(5):
            for name in buckets:
                with contextlib.suppress(NotFoundError):
                    await conns[0].jetstream().delete_stream(name)
            await asyncio.gather(*(topology.ensure(nc.jetstream(), settings) for nc in conns))
            for name in buckets:
                info = await conns[0].jetstream().stream_info(name)
                assert not info.config.allow_rollup_hdrs, name
    finally:
        for nc in conns:
            await nc.close()
