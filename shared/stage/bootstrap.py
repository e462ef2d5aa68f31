"""One bootstrap for every consumer stage: connect, topology, consumer, sweeper, drain.

``serve(spec, settings, stop, telemetry)`` runs a ``StageSpec`` until ``stop``:

1. the spec's readiness checks, then NATS (waiting for it to come up), its connection
   watched by /readyz; the streams and buckets ensured (``topology.ensure``);
2. the spec's ``build``, handed the ``Wiring`` (connection, JetStream, body transport,
   settings, telemetry; ``connect`` opens a second account's connection, as a hybrid
   edge needs; ``beside`` adds work that runs with the consumer);
3. its durable consumer created or updated from ``consumer`` settings;
4. readiness ``started``; the consumer runs, with the blob sweeper over the spec's
   ``sweeps`` buckets and whatever ``build`` put ``beside`` it;
5. on ``stop``: in-flight messages finish, then every connection is drained.

The pieces (``Wiring``, ``Link``) are what the scu-gateway, which runs several
consumers in one process, builds its own consumers from (``Wiring.consumer``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicomflow.shared.nats import blobsweeper, natsconn, topology
from dicomflow.shared.nats.transport import Transport
from dicomflow.shared.settings import ConsumerSettings, NatsSettings
from dicomflow.shared.stage.consumer import Consumer, Gate, LetterHook
from dicomflow.shared.stage.delivery import BatchHandler, Decoder, R
from dicomflow.shared.stage.spec import StageSpec
from dicomflow.shared.telemetry.bundle import Telemetry
from nats.aio.client import Client
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

Beside = Callable[[asyncio.Event], Awaitable[None]]


class StageSettings(Protocol):
    """The settings every consumer stage has (its settings class may have more)."""

    @property
    def nats(self) -> NatsSettings: ...

    @property
    def consumer(self) -> ConsumerSettings: ...

    @property
    def spool_dir(self) -> Path | None: ...


@dataclass(frozen=True, slots=True)
class Link:
    """One NATS connection of a stage: the client, its JetStream, the body transport."""

    nc: Client
    js: JetStreamContext
    transport: Transport


class Wiring:
    """What a stage's ``build`` gets: its connection (``main``), settings, telemetry,
    the stop event; ``connect`` and ``beside`` add to what ``serve`` runs and drains."""

    def __init__(
        self,
        name: str,
        main: Link,
        settings: StageSettings,
        telemetry: Telemetry,
        stop: asyncio.Event,
    ) -> None:
        self.name = name
        self.main = main
        self.settings = settings
        self.telemetry = telemetry
        self.stop = stop
        self.links: list[Link] = []  # connections besides ``main``, drained on stop
        self.besides: list[Beside] = []

    @property
    def js(self) -> JetStreamContext:
        return self.main.js

    @property
    def transport(self) -> Transport:
        return self.main.transport

    async def connect(self, nats: NatsSettings, suffix: str) -> Link:
        """A connection to another account (a hybrid edge's sealed side): watched by
        /readyz, its topology ensured, drained when the stage stops."""
        link = await open_link(
            nats, f"{self.name}-{suffix}", self.settings.spool_dir, self.telemetry, self.stop
        )
        self.links.append(link)
        await topology.ensure(link.js, nats)
        return link

    def beside(self, work: Beside) -> None:
        """Run ``work(stop)`` alongside the consumer until the stage stops."""
        self.besides.append(work)

    async def consumer(
        self,
        *,
        stage: str,
        stream: str,
        durable: str,
        decoder: Decoder[R],
        handler: BatchHandler[R],
        on: Link | None = None,
        filter_subject: str | None = None,
        settings: ConsumerSettings | None = None,
        gate: Gate | None = None,
        letter: LetterHook[R] | None = None,
        dead_letters: JetStreamContext | None = None,
        batch: int = 1,
    ) -> Consumer[R]:
        """A durable consumer on ``on`` (default ``main``), created or updated first
        (filtered to ``filter_subject`` if given) from ``settings`` (default: the
        stage's ``consumer`` settings)."""
        link = on or self.main
        consumer_settings = settings or self.settings.consumer
        if filter_subject is None:
            await topology.ensure_consumer(link.js, stream, durable, consumer_settings)
        else:
            await topology.ensure_filtered_consumer(
                link.js, stream, durable, filter_subject, consumer_settings
            )
        return Consumer(
            link.js,
            stage=stage,
            stream=stream,
            durable=durable,
            decoder=decoder,
            handler=handler,
            settings=consumer_settings,
            telemetry=self.telemetry,
            gate=gate,
            letter=letter,
            dead_letters=dead_letters,
            batch=batch,
        )

    async def drain(self) -> None:
        for link in reversed(self.links):
            await link.nc.drain()
        await self.main.nc.drain()


async def open_link(
    nats: NatsSettings,
    name: str,
    spool_dir: Path | None,
    telemetry: Telemetry,
    stop: asyncio.Event,
) -> Link:
    """Connect as ``name`` (waiting for NATS until ``stop``), watched by /readyz."""
    nc = await natsconn.connect(nats, name, stop)
    telemetry.readiness.add_nats(nc)
    js = nc.jetstream()
    transport = Transport(nc, js, publish_timeout=nats.publish_timeout, spool_dir=spool_dir)
    return Link(nc, js, transport)


async def wire(
    name: str, settings: StageSettings, stop: asyncio.Event, telemetry: Telemetry
) -> Wiring:
    """The stage's main connection, its topology ensured (the caller drains it:
    ``Wiring.drain``)."""
    link = await open_link(settings.nats, name, settings.spool_dir, telemetry, stop)
    wiring = Wiring(name, link, settings, telemetry, stop)
    try:
        await topology.ensure(link.js, settings.nats)
    except BaseException:
        await wiring.drain()
        raise
    return wiring


async def serve(
    spec: StageSpec[R], settings: StageSettings, stop: asyncio.Event, telemetry: Telemetry
) -> None:
    """Run the stage ``spec`` until ``stop`` is set (see the module docstring)."""
    if spec.readiness is not None:
        spec.readiness(telemetry.readiness)
    wiring = await wire(spec.name, settings, stop, telemetry)
    try:
        parts = await spec.build(wiring)
        consumer = await wiring.consumer(
            stage=spec.name,
            stream=spec.stream,
            durable=spec.durable,
            decoder=spec.decoder(wiring.transport),
            handler=parts.handle,
            gate=parts.gate,
            letter=parts.letter,
            batch=settings.consumer.batch if spec.batch is None else spec.batch,
        )
        telemetry.readiness.started()
        work: list[Awaitable[None]] = [consumer.run(stop)]
        if spec.sweeps:
            nats = settings.nats
            work.append(
                blobsweeper.run_periodically(
                    wiring.js, nats.blob_sweep_interval, nats.blob_orphan_grace, stop, spec.sweeps
                )
            )
        work.extend(task(stop) for task in wiring.besides)
        await asyncio.gather(*work)
    finally:
        await wiring.drain()
