"""What faststream 0.7 does not carry of our consumer semantics, shown on a real nats-server.

Issue 16 asked to build the stage seam on faststream if it carries explicit awaited
acks, nak with delay, in-progress heartbeats, term, batches and the outage ride-out. These
tests pass by asserting the gaps that decided against it (docs/decisions/faststream.md):

- it sends no in-progress acks: a handler running past ``ack_wait`` is delivered again,
  to a second worker, while the first still works on it; our consumer loop keeps it;
- its automatic ack policies do not fit: ``ACK`` acks without waiting for the server's
  answer, ``NACK_ON_ERROR`` naks at once with no delay until ``max_deliver`` and leaves
  the message in the stream, dead-lettered nowhere, and the default ``REJECT_ON_ERROR``
  terminates a message on its first transient error.

With ``AckPolicy.MANUAL`` a handler can do each of these itself; then it is our code,
not faststream's. If a later faststream closes a gap, its test fails: read the decision.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import nats
import pytest
from dicomflow.shared.nats import topology
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.stage import delivery
from dicomflow.shared.stage.consumer import Consumer
from dicomflow.shared.stage.delivery import AfterAck, Delivery
from dicomflow.shared.telemetry.bundle import Telemetry
from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.annotations import NatsMessage
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import RetentionPolicy

from dicomflow.embedded.natsserver import NatsServer

pytestmark = pytest.mark.integration

STREAM, DURABLE, SUBJECT = "WORKQ", "worker", "wq.job"
SETTINGS = ConsumerSettings(
    concurrency=2, max_deliver=3, ack_wait=2.0, backoff_initial=1.0, backoff_max=2.0
)
LONG_WORK = 5.0  # seconds: more than twice ack_wait


@asynccontextmanager
async def work_queue(server: NatsServer) -> AsyncIterator[tuple[Client, list[bytes]]]:
    """The stream and our durable (made by our topology's config), and every ack-subject
    payload seen (b"" ack, b"-NAK", b"+WPI" in progress, b"+TERM")."""
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=["wq.>"], retention=RetentionPolicy.WORK_QUEUE)
    await js.add_consumer(STREAM, topology.consumer_config(DURABLE, SETTINGS))
    acks: list[bytes] = []

    async def spy(msg: Msg) -> None:
        acks.append(msg.data.split(b" ")[0])

    await nc.subscribe(f"$JS.ACK.{STREAM}.{DURABLE}.>", cb=spy)
    try:
        yield nc, acks
    finally:
        await nc.close()


@asynccontextmanager
async def faststream_worker(
    server: NatsServer, handler: Callable[..., Awaitable[None]], policy: AckPolicy
) -> AsyncIterator[None]:
    """A faststream pull subscriber bound to our durable, ``concurrency`` workers."""
    broker = NatsBroker(server.url, logger=None, graceful_timeout=LONG_WORK + 2)
    broker.subscriber(
        SUBJECT,
        stream=JStream(STREAM, declare=False),
        durable=DURABLE,
        pull_sub=PullSub(batch_size=1, timeout=1.0),
        ack_policy=policy,
        max_workers=SETTINGS.concurrency,
    )(handler)
    await broker.start()
    try:
        yield
    finally:
        await broker.stop()


async def left_in_stream(nc: Client) -> int:
    count: int = (await nc.jetstream().stream_info(STREAM)).state.messages
    return count


async def test_faststream_sends_no_in_progress_acks(nats_server: NatsServer) -> None:
    deliveries: list[int] = []
    async with work_queue(nats_server) as (nc, acks):

        async def slow(body: bytes, msg: NatsMessage) -> None:
            deliveries.append(msg.raw_message.metadata.num_delivered)
            await asyncio.sleep(LONG_WORK)
            await msg.ack_sync()

        async with faststream_worker(nats_server, slow, AckPolicy.MANUAL):
            await nc.jetstream().publish(SUBJECT, b"job")
            await asyncio.sleep(LONG_WORK + 0.5)
        # The gap: no +WPI was sent, so the server gave the message to the second worker
        # while the first still handled it (twice over: max_deliver 3 spent in one go).
        assert b"+WPI" not in acks
        assert deliveries[:2] == [1, 2], deliveries
        assert len(deliveries) >= 2, "faststream kept the message: the heartbeat gap closed"


async def test_our_consumer_keeps_a_long_handler_with_in_progress_acks(
    nats_server: NatsServer,
) -> None:
    """The same work in our consumer loop: one delivery, kept by +WPI, then acked."""
    deliveries: list[int] = []
    async with work_queue(nats_server) as (nc, acks):
        done = asyncio.Event()

        async def slow(got: Delivery[Msg]) -> AfterAck | None:
            deliveries.append(got.attempt)
            await asyncio.sleep(LONG_WORK)
            return _set(done)

        stop = asyncio.Event()
        consumer = Consumer(
            nc.jetstream(),
            stage="worker",
            stream=STREAM,
            durable=DURABLE,
            decoder=delivery.raw,
            handler=delivery.one_at_a_time(slow),
            settings=SETTINGS,
            telemetry=Telemetry.create("test"),
        )
        task = asyncio.create_task(consumer.run(stop))
        try:
            await nc.jetstream().publish(SUBJECT, b"job")
            await asyncio.wait_for(done.wait(), LONG_WORK + 10)
        finally:
            stop.set()
            await task
        assert deliveries == [1]
        assert b"+WPI" in acks
        assert await left_in_stream(nc) == 0


async def test_faststream_ack_policy_does_not_await_the_ack(nats_server: NatsServer) -> None:
    async with work_queue(nats_server) as (nc, _):
        replies: list[str] = []

        async def spy(msg: Msg) -> None:
            replies.append(msg.reply)

        await nc.subscribe(f"$JS.ACK.{STREAM}.{DURABLE}.>", cb=spy)

        async def ok(body: bytes) -> None:
            return None

        async with faststream_worker(nats_server, ok, AckPolicy.ACK):
            await nc.jetstream().publish(SUBJECT, b"job")
            await _until(lambda: bool(replies))
        # An awaited ack (ack_sync) is a request: it carries a reply subject for the
        # server's answer. faststream's ACK policy publishes the ack and moves on.
        assert replies == [""], replies


async def test_faststream_nack_on_error_spends_every_delivery_at_once(
    nats_server: NatsServer,
) -> None:
    times: list[float] = []
    async with work_queue(nats_server) as (nc, acks):

        async def failing(body: bytes) -> None:
            times.append(time.monotonic())
            raise ConnectionError("a passing fault")

        async with faststream_worker(nats_server, failing, AckPolicy.NACK_ON_ERROR):
            await nc.jetstream().publish(SUBJECT, b"job")
            await _until(lambda: len(times) >= SETTINGS.max_deliver)
            await asyncio.sleep(1.0)  # room for a dead letter or a further delivery
        # No backoff: all max_deliver deliveries within a second, each nak'ed at once
        # (our loop waits backoff_initial, 0.5-1 s here, then 1-2 s), and then the
        # message sits in the stream: no delivery left, dead-lettered nowhere.
        assert len(times) == SETTINGS.max_deliver
        assert times[-1] - times[0] < 1.0, [round(t - times[0], 2) for t in times]
        assert acks.count(b"-NAK") == SETTINGS.max_deliver
        assert await left_in_stream(nc) == 1
        info = await nc.jetstream().consumer_info(STREAM, DURABLE)
        assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_faststream_default_policy_terminates_on_a_transient_error(
    nats_server: NatsServer,
) -> None:
    deliveries = 0
    async with work_queue(nats_server) as (nc, acks):

        async def failing(body: bytes) -> None:
            nonlocal deliveries
            deliveries += 1
            raise ConnectionError("a passing fault")

        async with faststream_worker(nats_server, failing, AckPolicy.REJECT_ON_ERROR):
            await nc.jetstream().publish(SUBJECT, b"job")
            await _until(lambda: b"+TERM" in acks)
            await asyncio.sleep(1.0)
        # One transient error and the message is gone: never retried, never dead-lettered.
        assert deliveries == 1
        assert acks == [b"+TERM"]
        assert await left_in_stream(nc) == 0


def _set(event: asyncio.Event) -> AfterAck:
    async def after() -> None:
        event.set()

    return after


async def _until(probe: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)
