"""Acked messages a crashed nats-server brings back into a work queue are removed.

The fault suite saw it after repeated kill -9 of nats-server: INGEST held hundreds of
messages below the encryptor's ack floor, all acked and stored, that no consumer would
ever take again. Here the same state is made on purpose: the stream's message files are
copied before the acks and put back after them, as a crash losing the deletions would.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import nats
import pytest
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.stage import delivery
from dicomflow.shared.stage.consumer import Consumer
from dicomflow.shared.stage.delivery import AfterAck, Delivery
from dicomflow.shared.telemetry.bundle import Telemetry
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy

from dicomflow.embedded.natsserver import NatsServer

pytestmark = pytest.mark.integration

STREAM = "WORKQ"
DURABLE = "worker"


async def _messages(url: str) -> int:
    nc = await nats.connect(url)
    try:
        count: int = (await nc.jetstream().stream_info(STREAM)).state.messages
        return count
    finally:
        await nc.close()


async def _acks_lost_in_a_crash(
    tmp_path: Path, stream: str, retention: RetentionPolicy, acks: dict[str, int]
) -> NatsServer:
    """20 messages on ``stream`` (subjects ``<stream>.<i>``), acked by each durable of
    ``acks`` as far as it says, then the server restarted with its message files as they
    were before the acks, as a crash losing the deletions would. Returns it running."""
    store = tmp_path / "js"
    msgs = store / "jetstream" / "$G" / "streams" / stream / "msgs"
    server = NatsServer(store).start()
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[f"{stream}.>"], retention=retention)
        for durable in acks:
            await js.add_consumer(
                stream, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT)
            )
        for i in range(20):
            await js.publish(f"{stream}.{i}", b"body")
        await nc.close()
        port = server.port
        server.stop()
        shutil.copytree(msgs, tmp_path / "before-acks")

        server = NatsServer(store, port=port).start()
        nc = await nats.connect(server.url)
        for durable, count in acks.items():
            sub = await nc.jetstream().pull_subscribe_bind(durable, stream)
            for msg in await sub.fetch(count, timeout=5):
                await msg.ack_sync()
            await sub.unsubscribe()
        await nc.close()
        server.stop()
        shutil.rmtree(msgs)
        shutil.copytree(tmp_path / "before-acks", msgs)  # the deletions are lost
        return NatsServer(store, port=port).start()
    except BaseException:
        server.stop()
        raise


async def test_acked_messages_that_reappear_below_the_ack_floor_are_removed(
    tmp_path: Path,
) -> None:
    server = await _acks_lost_in_a_crash(
        tmp_path, STREAM, RetentionPolicy.WORK_QUEUE, {DURABLE: 20}
    )
    try:
        assert await _messages(server.url) == 20  # back, below the ack floor

        handled: list[str] = []

        async def handler(d: Delivery[nats.aio.msg.Msg]) -> AfterAck | None:
            handled.append(d.message.subject)
            return None

        nc = await nats.connect(server.url)
        stop = asyncio.Event()
        consumer = Consumer(
            nc.jetstream(),
            stage="worker",
            stream=STREAM,
            durable=DURABLE,
            decoder=delivery.raw,
            handler=delivery.one_at_a_time(handler),
            settings=ConsumerSettings(concurrency=1),
            telemetry=Telemetry.create("test"),
        )
        task = asyncio.create_task(consumer.run(stop))
        try:
            for _ in range(100):
                if await _messages(server.url) == 0:
                    break
                await asyncio.sleep(0.1)
            assert await _messages(server.url) == 0
            # A message published after the purge is still consumed: nothing above the
            # ack floor is touched.
            await nc.jetstream().publish(f"{STREAM}.new", b"body")
            for _ in range(100):
                if handled:
                    break
                await asyncio.sleep(0.1)
            assert handled == [f"{STREAM}.new"]  # the leftovers were never handed out again
        finally:
            stop.set()
            await task
            await nc.close()
    finally:
        server.stop()


async def test_interest_stream_drops_what_every_consumer_acked_when_it_recovers(
    tmp_path: Path,
) -> None:
    """SEALED has interest retention, and needs no such sweep: nats-server itself removes,
    when it recovers, what every consumer acked, and keeps what one has not (the relay
    consumer behind the store writer)."""
    stream = "INTEREST"
    server = await _acks_lost_in_a_crash(
        tmp_path, stream, RetentionPolicy.INTEREST, {"store-writer": 20, "relay": 8}
    )
    try:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            state = (await js.stream_info(stream)).state
            # The eight both consumers acked are gone again; the relay's twelve remain.
            assert (state.first_seq, state.messages) == (9, 12)
            sub = await js.pull_subscribe_bind("relay", stream)
            rest = await sub.fetch(12, timeout=5)
            assert [m.subject for m in rest] == [f"{stream}.{i}" for i in range(8, 20)]
            assert await js.pull_subscribe_bind("store-writer", stream)
        finally:
            await nc.close()
    finally:
        server.stop()
