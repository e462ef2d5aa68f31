"""The floor of the design: two durable JetStream work-queue streams and nothing else.

dicomflow carries each image through two JetStream streams (INGEST, SEALED) on a
nats-server that fsyncs before each acknowledgement. What such a chain costs by itself,
on this machine, is measured here with the same bodies and the same server settings, by
one minimal nats-py client, three coroutines on one connection, in batches of 16:

* producer: publishes 16 bodies to stream A and awaits their 16 PubAcks, then the next 16;
* mover: fetches up to 16 from A, republishes each to stream B and awaits the PubAcks,
  then acks the 16 on A (never upstream before downstream has it);
* sink: fetches up to 16 from B and acks them.

The rate is images over the time from the first publish until the sink acked the last
one (its acks flushed to the server). nats-server's CPU (user + system, from /proc) over
that time, per image, is the bus's own cost: the figure the stages are held against.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nats
from common import NATS_SYNC_INTERVAL, MemorySampler, cpu_seconds
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from dicomflow.embedded.natsserver import NatsServer

BATCH = 16
FETCH_TIMEOUT = 10.0


@dataclass
class FloorResult:
    images: int
    seconds: float
    nats_cpu_s: float
    client_cpu_s: float
    memory_mib: dict[str, float]

    @property
    def images_per_s(self) -> float:
        return round(self.images / self.seconds, 1)

    @property
    def nats_cpu_ms_per_image(self) -> float:
        return round(self.nats_cpu_s * 1000 / self.images, 2)

    @property
    def client_cpu_ms_per_image(self) -> float:
        return round(self.client_cpu_s * 1000 / self.images, 2)


async def _chain(
    url: str, server_pid: int, count: int, body: Callable[[int], bytes]
) -> tuple[float, float, float]:
    """Push ``count`` bodies through A then B: (seconds, client CPU s, nats-server CPU s)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for name, subject in (("FLOOR_A", "floor.a"), ("FLOOR_B", "floor.b")):
            await js.add_stream(
                StreamConfig(
                    name=name,
                    subjects=[subject],
                    retention=RetentionPolicy.WORK_QUEUE,
                    storage=StorageType.FILE,
                )
            )
        config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000)
        sub_a = await js.pull_subscribe("floor.a", durable="mover", config=config)
        sub_b = await js.pull_subscribe("floor.b", durable="sink", config=config)

        async def producer() -> None:
            for start in range(0, count, BATCH):
                end = min(start + BATCH, count)
                await asyncio.gather(*(js.publish("floor.a", body(i)) for i in range(start, end)))

        async def mover() -> None:
            moved = 0
            while moved < count:
                msgs = await sub_a.fetch(BATCH, timeout=FETCH_TIMEOUT)
                await asyncio.gather(*(js.publish("floor.b", m.data) for m in msgs))
                for m in msgs:
                    await m.ack()
                moved += len(msgs)

        async def sink() -> None:
            done = 0
            while done < count:
                msgs = await sub_b.fetch(BATCH, timeout=FETCH_TIMEOUT)
                for m in msgs:
                    await m.ack()
                done += len(msgs)
            await nc.flush()

        server0, cpu0, t0 = cpu_seconds(server_pid), time.thread_time(), time.perf_counter()
        await asyncio.gather(producer(), mover(), sink())
        seconds, client = time.perf_counter() - t0, time.thread_time() - cpu0
        server1 = cpu_seconds(server_pid)
        return seconds, client, (server1 or 0.0) - (server0 or 0.0)
    finally:
        await nc.close()


def run_floor(paths: list[Path], work: Path) -> FloorResult:
    """The chain on a fresh nats-server (``sync_interval: always``) in ``work``."""
    bodies = [p.read_bytes() for p in paths]  # read before timing: no disk in the loop
    server = NatsServer(work / "nats", sync_interval=NATS_SYNC_INTERVAL)
    server.start()
    try:
        sampler = MemorySampler({"nats-server": (server.pid, False)}).start()
        seconds, client_cpu, nats_cpu = asyncio.run(
            _chain(server.url, server.pid, len(bodies), bodies.__getitem__)
        )
        memory = sampler.finish()
    finally:
        server.stop()
    return FloorResult(
        images=len(bodies),
        seconds=seconds,
        nats_cpu_s=nats_cpu,
        client_cpu_s=client_cpu,
        memory_mib=memory,
    )
