"""Same-run A/B: dicomflow's consumer loop (``shared.consumer.Consumer``) against a
faststream 0.7 pull subscriber, on one real nats-server with ``sync_interval: always``.

Both run the same handler: republish the body (0.5 MiB by default) to a second stream,
awaiting the PubAck, then acknowledge with an awaited ack (``ack_sync``). The input
stream is filled before each run, the durable consumer is made by our topology code
(``topology.consumer_config``) and both bind to it. faststream runs with
``AckPolicy.MANUAL`` (the only policy whose ack is awaited), ``max_workers`` equal to our
``concurrency`` and its access log off (ours logs nothing per message either).

Printed per variant: messages/s (first fetch to last ack) and the CPU seconds this
process spent per 1000 messages (user + system; the server's are printed beside them).
Needs ``faststream[nats]`` (requirements-test.lock). See docs/decisions/faststream.md.

Run under the shared lock:
``flock /tmp/dicomflow-bench.lock .venv/bin/python bench/faststream_ab.py``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
import psutil
from dicomflow.shared.nats import topology
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.stage import delivery, runner
from dicomflow.shared.stage.consumer import Consumer
from dicomflow.shared.stage.delivery import AfterAck, Delivery
from dicomflow.shared.telemetry.bundle import Telemetry
from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub
from faststream.nats.annotations import NatsMessage
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy

from dicomflow.embedded.natsserver import NatsServer

IN, OUT, DURABLE = "BENCH_IN", "BENCH_OUT", "bench"
IN_SUBJECT, OUT_SUBJECT = "bench.in.x", "bench.out.x"
Variant = Callable[[str, ConsumerSettings, int, asyncio.Event], Awaitable[None]]


@dataclass
class Figures:
    name: str
    seconds: float
    cpu: float  # this process, user + system
    server_cpu: float
    count: int

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def cpu_per_1000(self) -> float:
        return self.cpu / self.count * 1000

    def line(self) -> str:
        return (
            f"{self.name:11s} {self.rate:8.1f} msgs/s   {self.cpu_per_1000:6.2f} CPU s/1000 msgs"
            f"   (nats-server {self.server_cpu / self.count * 1000:5.2f} CPU s/1000)"
        )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _prepare(
    js: JetStreamContext, settings: ConsumerSettings, count: int, body: bytes
) -> None:
    """Empty OUT, (re)make the durable on IN with our topology's config, fill IN."""
    await js.purge_stream(OUT)
    await js.purge_stream(IN)
    await js.add_consumer(IN, topology.consumer_config(DURABLE, settings))
    window = 64
    for start in range(0, count, window):
        await asyncio.gather(
            *(js.publish(IN_SUBJECT, body, timeout=30) for _ in range(min(window, count - start)))
        )


async def _measure(
    name: str, server: NatsServer, count: int, run: Callable[[asyncio.Event], Awaitable[None]]
) -> Figures:
    proc = psutil.Process(server.pid)
    done = asyncio.Event()
    server_before = sum(proc.cpu_times()[:2])
    cpu_before, start = _cpu(), time.perf_counter()
    await run(done)
    seconds, cpu = time.perf_counter() - start, _cpu() - cpu_before
    return Figures(name, seconds, cpu, sum(proc.cpu_times()[:2]) - server_before, count)


async def ours(url: str, settings: ConsumerSettings, count: int, done: asyncio.Event) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    acked = 0

    async def counted() -> None:
        nonlocal acked
        acked += 1
        if acked == count:
            done.set()

    async def handler(got: Delivery[Msg]) -> AfterAck | None:
        await js.publish(OUT_SUBJECT, got.record.data, timeout=10)
        return counted  # run once the ack went through

    stop = asyncio.Event()
    consumer = Consumer(
        js,
        stage="bench",
        stream=IN,
        durable=DURABLE,
        decoder=delivery.raw,
        handler=delivery.concurrently(handler),
        settings=settings,
        telemetry=Telemetry.create("bench"),
    )
    task = asyncio.create_task(consumer.run(stop))
    await done.wait()
    stop.set()
    await task
    await nc.close()


async def faststream(url: str, settings: ConsumerSettings, count: int, done: asyncio.Event) -> None:
    broker = NatsBroker(url, logger=None)
    acked = 0

    async def handler(body: bytes, msg: NatsMessage) -> None:
        nonlocal acked
        await broker.config.connection_state.stream.publish(OUT_SUBJECT, body, timeout=10)
        await msg.ack_sync()
        acked += 1
        if acked == count:
            done.set()

    broker.subscriber(
        IN_SUBJECT,
        stream=JStream(IN, declare=False),
        durable=DURABLE,
        pull_sub=PullSub(batch_size=settings.concurrency, timeout=1.0),
        ack_policy=AckPolicy.MANUAL,
        max_workers=settings.concurrency,
    )(handler)
    await broker.start()
    await done.wait()
    await broker.stop()


async def main_async(count: int, size: int, concurrency: int, rounds: int) -> None:
    settings = ConsumerSettings(concurrency=concurrency, ack_wait=30.0)
    body = os.urandom(size)
    with (
        tempfile.TemporaryDirectory() as folder,
        NatsServer(Path(folder) / "js", sync_interval="always") as server,
    ):
        results = await _rounds(server, settings, count, body, rounds)
    ours_f, theirs = _total(results["dicomflow"]), _total(results["faststream"])
    print(
        f"\n{count} msgs x {size} B, concurrency {concurrency}, {rounds} round(s), "
        "sync_interval always"
    )
    print(ours_f.line())
    print(theirs.line())
    print(
        f"faststream / dicomflow: throughput {theirs.rate / ours_f.rate:.2f}x, "
        f"CPU per message {theirs.cpu_per_1000 / ours_f.cpu_per_1000:.2f}x"
    )


async def _rounds(
    server: NatsServer, settings: ConsumerSettings, count: int, body: bytes, rounds: int
) -> dict[str, list[Figures]]:
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await js.add_stream(name=IN, subjects=[IN_SUBJECT], retention=RetentionPolicy.WORK_QUEUE)
    await js.add_stream(name=OUT, subjects=[OUT_SUBJECT])
    variants = {"dicomflow": ours, "faststream": faststream}
    results: dict[str, list[Figures]] = {name: [] for name in variants}
    order = list(variants)
    for _ in range(rounds):
        for name in order:
            await _prepare(js, settings, count, body)
            variant = variants[name]

            async def run(done: asyncio.Event, variant: Variant = variant) -> None:
                await variant(server.url, settings, count, done)

            figures = await _measure(name, server, count, run)
            left = (await js.stream_info(IN)).state.messages
            out = (await js.stream_info(OUT)).state.messages
            if left or out != count:
                raise SystemExit(f"{name}: {left} left in {IN}, {out} in {OUT}, want {count}")
            print(figures.line(), flush=True)
            results[name].append(figures)
        order.reverse()  # A B, then B A: neither always runs on a warmer server
    await nc.close()
    return results


def _total(runs: list[Figures]) -> Figures:
    return Figures(
        runs[0].name,
        sum(r.seconds for r in runs),
        sum(r.cpu for r in runs),
        sum(r.server_cpu for r in runs),
        sum(r.count for r in runs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000, help="messages per run (2000)")
    parser.add_argument("--size", type=int, default=512 * 1024, help="body bytes (0.5 MiB)")
    parser.add_argument("--concurrency", type=int, default=4, help="handlers at once (4)")
    parser.add_argument("--rounds", type=int, default=1, help="A/B rounds, order alternating (1)")
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the event loop both run on (uvloop, as the stages do)",
    )
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=runner.loop_factory(args.event_loop)) as loop:
        loop.run(main_async(args.count, args.size, args.concurrency, args.rounds))


if __name__ == "__main__":
    main()
