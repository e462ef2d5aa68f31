"""The pull engine under the consumer loop: fetch, ack, nak, in-progress and term.

``Consumer`` decides what to do with each message; an ``Engine`` only talks to the
broker. ``PullEngine`` is nats-py's pull subscription on a durable consumer; another
engine (faststream's batched pull subscriber, an in-memory fake in unit tests) can
stand in for it by offering the same five operations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Protocol

from dicomflow.shared.nats.errormap import nats_errors
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext


class Engine(Protocol):
    async def fetch(self, batch: int, wait: float) -> Sequence[Msg]:
        """Up to ``batch`` messages, [] when none came within ``wait`` seconds;
        BrokerUnavailable when the broker could not be asked."""

    async def ack(self, msg: Msg) -> None:
        """Acknowledge and wait for the server's confirmation; BrokerUnavailable if none."""

    async def nak(self, msg: Msg, delay: float) -> None:
        """Ask for redelivery after ``delay`` seconds."""

    async def in_progress(self, msg: Msg) -> None:
        """Reset the message's ack wait (best effort)."""

    async def term(self, msg: Msg) -> None:
        """Never deliver the message again."""

    async def close(self) -> None:
        """Stop fetching."""


class PullEngine:
    """A nats-py pull subscription bound to a durable consumer."""

    def __init__(self, sub: JetStreamContext.PullSubscription) -> None:
        self._sub = sub

    @classmethod
    async def bind(cls, js: JetStreamContext, durable: str, stream: str) -> PullEngine:
        return cls(await js.pull_subscribe_bind(durable, stream))

    async def fetch(self, batch: int, wait: float) -> Sequence[Msg]:
        with nats_errors("fetch failed"):
            try:
                return await self._sub.fetch(batch, timeout=wait)
            except (NatsTimeoutError, TimeoutError):
                return []  # an answer, not a failure: nothing came within ``wait``

    async def ack(self, msg: Msg) -> None:
        with nats_errors("ack failed"):
            await msg.ack_sync(timeout=10.0)

    async def nak(self, msg: Msg, delay: float) -> None:
        with nats_errors("nak failed"):
            await msg.nak(delay=delay)

    async def in_progress(self, msg: Msg) -> None:
        with contextlib.suppress(NatsError, TimeoutError):
            await msg.in_progress()

    async def term(self, msg: Msg) -> None:
        with nats_errors("term failed"):
            await msg.term()

    async def close(self) -> None:
        with contextlib.suppress(NatsError):
            await self._sub.unsubscribe()
