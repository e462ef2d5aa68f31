"""Connecting to NATS: retried at start-up, reconnecting for ever afterwards."""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoServersError

from dicomflow.shared.errors import BrokerUnavailable
from dicomflow.shared.settings import NatsSettings

log = logging.getLogger(__name__)


async def connect(settings: NatsSettings, name: str, stop: asyncio.Event | None = None) -> Client:
    """Connect, waiting for NATS to come up (until ``stop`` is set, if given)."""
    delay = 0.5
    client: list[Client] = []

    async def on_disconnect() -> None:
        if client and (client[0].is_draining or client[0].is_closed):
            return  # our own drain or close, not an outage
        log.warning("disconnected from NATS; reconnecting")

    while True:
        try:
            nc = await nats.connect(
                servers=settings.servers,
                name=f"dicomflow-{name}",
                connect_timeout=settings.connect_timeout,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1.0,
                error_cb=_on_error,
                disconnected_cb=on_disconnect,
                reconnected_cb=_on_reconnect,
            )
        except (NoServersError, NatsError, OSError, TimeoutError) as exc:
            if stop is not None and stop.is_set():
                raise
            log.warning("NATS not reachable (%r); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        else:
            client.append(nc)
            return nc


async def connect_once(settings: NatsSettings, name: str) -> Client:
    """Connect for a command-line tool: fail at once with an actionable message."""
    try:
        return await nats.connect(
            servers=settings.servers,
            name=f"dicomflow-{name}",
            connect_timeout=settings.connect_timeout,
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )
    except (NoServersError, NatsError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(
            f"cannot reach NATS at {', '.join(settings.servers)} ({type(exc).__name__}); "
            "is dicomflow (or `dicomflow up`) running?"
        ) from exc


async def _on_error(exc: Exception) -> None:
    log.warning("NATS connection error: %r", exc)


async def _on_reconnect() -> None:
    log.info("reconnected to NATS")
