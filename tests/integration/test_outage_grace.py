"""A NATS or storage outage of seconds is ridden out in place, not spent on deliveries.

The fault suite's cluster scenario dead-lettered instances that were never poison: each
leader election answered the store-writer's index write with "no responders", every
failure was nak'ed, and ten in a row exhausted ``max_deliver``. Here a real nats-server
delivers to the shared consumer loop and the handler fails as an outage would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import cast

import nats
import pytest
from dicomflow.shared.errors import BrokerUnavailable, StorageUnavailable, TransientError
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.stage import delivery
from dicomflow.shared.stage.consumer import Consumer
from dicomflow.shared.stage.delivery import AfterAck, Delivery
from dicomflow.shared.storage.index import Index
from dicomflow.shared.telemetry.bundle import Telemetry
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy
from nats.js.kv import KeyValue

from dicomflow.embedded.natsserver import NatsServer

pytestmark = pytest.mark.integration

STREAM = "WORKQ"
DURABLE = "worker"


Failure = Exception | Callable[[JetStreamContext], Awaitable[object]]


async def consume_one(
    server: NatsServer, settings: ConsumerSettings, failures: list[Failure]
) -> tuple[list[int], int]:
    """Publish one message and consume it; the handler raises ``failures`` in turn (or
    awaits one, given the JetStream context, which raises), then succeeds. Returns the
    delivery number of every handler call and the stream's message count at the end (0:
    acknowledged)."""
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=["wq.>"], retention=RetentionPolicy.WORK_QUEUE)
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            max_deliver=settings.max_deliver,
            ack_wait=settings.ack_wait,
        ),
    )
    await js.publish("wq.1", b"body")
    calls: list[int] = []
    done = asyncio.Event()

    async def handler(d: Delivery[Msg]) -> AfterAck | None:
        calls.append(d.attempt)
        if failures:
            failure = failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            await failure(js)
        done.set()
        return None

    stop = asyncio.Event()
    consumer = Consumer(
        js,
        stage="worker",
        stream=STREAM,
        durable=DURABLE,
        decoder=delivery.raw,
        handler=delivery.one_at_a_time(handler),
        settings=settings,
        telemetry=Telemetry.create("test"),
    )
    task = asyncio.create_task(consumer.run(stop))
    try:
        await asyncio.wait_for(done.wait(), 30)
        await wait_until(lambda: messages(js), 0)
        return calls, await messages(js)
    finally:
        stop.set()
        await task
        await nc.close()


async def messages(js: nats.js.JetStreamContext) -> int:
    count: int = (await js.stream_info(STREAM)).state.messages
    return count


async def wait_until(read: Callable[[], Awaitable[int]], want: int) -> None:
    for _ in range(100):
        if await read() == want:
            return
        await asyncio.sleep(0.05)


SETTINGS = ConsumerSettings(
    concurrency=1, max_deliver=2, ack_wait=5, backoff_initial=0.05, backoff_max=0.2
)


async def test_outage_is_ridden_out_in_one_delivery(nats_server: NatsServer) -> None:
    outage = [BrokerUnavailable("index write failed: NoStreamResponseError()")] * 4
    outage += [StorageUnavailable("writing object failed: connection reset")] * 2
    calls, left = await consume_one(nats_server, SETTINGS.model_copy(), outage)
    # Six failures with max_deliver 2: all in the first delivery, then acknowledged.
    assert calls == [1] * 7
    assert left == 0


async def test_outage_longer_than_the_grace_spends_a_delivery(nats_server: NatsServer) -> None:
    settings = SETTINGS.model_copy(update={"outage_grace": 0.0})
    calls, left = await consume_one(nats_server, settings, [BrokerUnavailable("no responders")])
    assert calls == [1, 2]  # nak'ed at once, handled again on the next delivery
    assert left == 0


async def test_other_transient_failures_are_not_retried_in_place(
    nats_server: NatsServer,
) -> None:
    calls, left = await consume_one(
        nats_server, SETTINGS.model_copy(), [TransientError("peer busy")]
    )
    assert calls == [1, 2]
    assert left == 0


class ResetKeyValue:
    """A real index bucket whose next read fails as a connection reset by the peer does,
    with the OSError nats-py lets through from its socket."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, key: str) -> KeyValue.Entry:
        raise ConnectionResetError(104, "Connection reset by peer")


async def index_read_reset(js: JetStreamContext) -> None:
    kv = await js.create_key_value(bucket="RESETS")
    await Index(cast(KeyValue, ResetKeyValue(kv)), js).get("1.2.826.0.1.3680043.8.498.1")


async def test_a_connection_reset_under_an_index_read_is_ridden_out(
    nats_server: NatsServer,
) -> None:
    # A raw OSError from a NATS call in the handler is an outage (the NATS edge's table):
    # three in a row are all tried again within the first delivery, none spends one.
    settings = SETTINGS.model_copy(update={"max_deliver": 5})
    calls, left = await consume_one(nats_server, settings, [index_read_reset] * 3)
    assert calls == [1] * 4
    assert left == 0
