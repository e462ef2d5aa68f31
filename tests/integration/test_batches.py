"""The consumer loop in batches, on a real nats-server.

A stage fetches up to ``consumer.batch`` messages and works their deliveries at once
(``delivery.concurrently``); each is settled by its own outcome, the publishes a batch
makes are all acknowledged before any of its messages is acked upstream, and a trickle
of messages is never held back waiting for a batch to fill.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import nats
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.contracts.deadletters import H_DLQ_SUBJECT
from dicomflow.shared.errors import BrokerUnavailable, PermanentError
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.stage import delivery
from dicomflow.shared.stage.consumer import Consumer
from dicomflow.shared.stage.delivery import AfterAck, Delivery, Outcome
from dicomflow.shared.stage.engine import Engine, PullEngine
from dicomflow.shared.telemetry.bundle import Telemetry
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy

from dicomflow.embedded.natsserver import NatsServer

pytestmark = pytest.mark.integration

STREAM = "WORKQ"
DOWN = "DOWNQ"
DURABLE = "worker"
SETTINGS = ConsumerSettings(
    concurrency=4, batch=16, max_deliver=3, ack_wait=5, backoff_initial=0.05, backoff_max=0.2
)


async def setup(js: JetStreamContext) -> None:
    await js.add_stream(name=STREAM, subjects=["wq.>"], retention=RetentionPolicy.WORK_QUEUE)
    await js.add_stream(name=DOWN, subjects=["down.>"], retention=RetentionPolicy.WORK_QUEUE)
    await js.add_stream(name="DLQ", subjects=[subjects.dlq_subject("worker")])
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=SETTINGS.max_deliver,
            ack_wait=SETTINGS.ack_wait,
        ),
    )


class Recording:
    """The pull engine, noting how many downstream PubAcks had come when each upstream
    ack was sent."""

    def __init__(self, inner: Engine, pubacks: list[str]) -> None:
        self._inner = inner
        self._pubacks = pubacks
        self.acks: list[tuple[str, int]] = []  # (subject, PubAcks received at that moment)

    async def fetch(self, batch: int, wait: float) -> Sequence[Msg]:
        return await self._inner.fetch(batch, wait)

    async def ack(self, msg: Msg) -> None:
        self.acks.append((msg.subject, len(self._pubacks)))
        await self._inner.ack(msg)

    async def nak(self, msg: Msg, delay: float) -> None:
        await self._inner.nak(msg, delay)

    async def in_progress(self, msg: Msg) -> None:
        await self._inner.in_progress(msg)

    async def term(self, msg: Msg) -> None:
        await self._inner.term(msg)

    async def close(self) -> None:
        await self._inner.close()


async def count(js: JetStreamContext, stream: str) -> int:
    messages: int = (await js.stream_info(stream)).state.messages
    return messages


async def test_a_batch_is_settled_per_delivery_after_all_its_publishes_were_acknowledged(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await setup(js)
    names = [f"wq.{i}" for i in range(12)]
    for name in names:  # all waiting before the consumer starts: one batch
        await js.publish(name, b"body")

    batches: list[list[str]] = []
    pubacks: list[str] = []
    outage = [BrokerUnavailable("index write failed: no responders")]
    working = 0
    most = 0

    async def handle(d: Delivery[Msg]) -> AfterAck | None:
        nonlocal working, most
        subject = d.message.subject
        working += 1
        most = max(most, working)
        try:
            await asyncio.sleep(0.05)  # the deliveries of the batch overlap here
            if subject == "wq.3":
                raise PermanentError("cannot be handled")
            if subject == "wq.7" and outage:
                raise outage.pop()
            await js.publish(subject.replace("wq.", "down."), b"sealed")
            pubacks.append(subject)
        finally:
            working -= 1
        return None

    inner = delivery.concurrently(handle)

    async def handler(batch: Sequence[Delivery[Msg]]) -> Sequence[Outcome]:
        batches.append([d.message.subject for d in batch])
        return await inner(batch)

    recording: Recording | None = None

    async def engine() -> Recording:
        nonlocal recording
        recording = Recording(await PullEngine.bind(js, DURABLE, STREAM), pubacks)
        return recording

    consumer = Consumer(
        js,
        stage="worker",
        stream=STREAM,
        durable=DURABLE,
        decoder=delivery.raw,
        handler=handler,
        settings=SETTINGS,
        telemetry=Telemetry.create("test"),
        batch=SETTINGS.batch,
        engine=engine,  # type: ignore[arg-type]
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        for _ in range(200):
            if await count(js, STREAM) == 0 and await count(js, "DLQ") == 1:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    try:
        assert batches[0] == names  # one fetch, one batch
        assert batches[1:] == [["wq.7"]]  # only the outage's delivery was handed again
        assert most >= 10  # worked at once, not one after the other
        assert recording is not None
        acked = dict(recording.acks)
        assert sorted(acked) == sorted(n for n in names if n != "wq.3")
        # No upstream ack before every publish of its batch was acknowledged.
        assert all(seen == len(names) - 1 for seen in acked.values())
        assert await count(js, STREAM) == 0  # every delivery settled
        assert await count(js, DOWN) == len(names) - 1
        letter = await js.get_msg("DLQ", 1)
        assert letter.headers is not None
        assert letter.headers[H_DLQ_SUBJECT] == "wq.3"
    finally:
        await nc.close()


async def test_a_trickle_is_handed_over_at_once_not_when_a_batch_fills(
    nats_server: NatsServer,
) -> None:
    """Messages arriving one by one, slower than they are handled: each is handed to
    the handler within moments, by whichever of the concurrent slots is free. (With
    one fetching worker per slot, their lingering pulls of a batch sharing one inbox,
    messages waited up to the fetch timeout, a second, to be read.)"""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await setup(js)
    published: dict[str, float] = {}
    waited: list[float] = []

    async def handle(d: Delivery[Msg]) -> AfterAck | None:
        waited.append(time.monotonic() - published[d.message.subject])
        await asyncio.sleep(0.005)
        return None

    consumer = Consumer(
        js,
        stage="worker",
        stream=STREAM,
        durable=DURABLE,
        decoder=delivery.raw,
        handler=delivery.concurrently(handle),
        settings=SETTINGS,
        telemetry=Telemetry.create("test"),
        batch=SETTINGS.batch,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.sleep(0.3)  # the consumer is waiting for messages
        for i in range(100):
            published[f"wq.{i}"] = time.monotonic()
            await js.publish(f"wq.{i}", b"body")
            await asyncio.sleep(0.005)
        for _ in range(100):
            if len(waited) == 100:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
        await nc.close()
    assert len(waited) == 100
    assert max(waited) < 0.4, f"a message waited {max(waited):.3f} s to be handled"


async def test_two_processes_on_one_durable_are_not_held_back_by_each_other(
    nats_server: NatsServer,
) -> None:
    """Two replicas of a stage (two connections, one durable), 16-message batches, a
    steady flow: each message is handled within moments and exactly once. (This flow did
    not reproduce the stall bench/ingest.py found with two processes per stage, 17
    images/s where one process stored 110; tests/unit/test_pull_engine.py pins the fetch
    that fixed it.)"""
    conns = [await nats.connect(nats_server.url) for _ in range(2)]
    await setup(conns[0].jetstream())
    published: dict[str, float] = {}
    waited: dict[str, list[float]] = {}

    async def handle(d: Delivery[Msg]) -> AfterAck | None:
        waited.setdefault(d.message.subject, []).append(
            time.monotonic() - published[d.message.subject]
        )
        await asyncio.sleep(0.005)
        return None

    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            Consumer(
                nc.jetstream(),
                stage="worker",
                stream=STREAM,
                durable=DURABLE,
                decoder=delivery.raw,
                handler=delivery.concurrently(handle),
                settings=SETTINGS,
                telemetry=Telemetry.create("test"),
                batch=SETTINGS.batch,
            ).run(stop)
        )
        for nc in conns
    ]
    js = conns[0].jetstream()
    try:
        await asyncio.sleep(0.3)  # both are waiting for messages
        for i in range(200):
            published[f"wq.{i}"] = time.monotonic()
            await js.publish(f"wq.{i}", b"body")
            await asyncio.sleep(0.003)
        for _ in range(100):
            if len(waited) == 200:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for nc in conns:
            await nc.close()
    assert len(waited) == 200
    assert all(len(times) == 1 for times in waited.values())
    longest = max(t for times in waited.values() for t in times)
    assert longest < 0.4, f"a message waited {longest:.3f} s to be handled"
