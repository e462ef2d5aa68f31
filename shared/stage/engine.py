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


# How long a fetch of the messages known to be waiting may linger for them: they are
# normally there at once; another process pulling from the same durable may have taken
# some, and then the request must not wait for its batch to fill.
MORE_WAIT = 0.02  # seconds


class PullEngine:
    """A nats-py pull subscription bound to a durable consumer.

    ``fetch`` never waits for a batch to fill. A pull of N lingers on the server until N
    messages came or it expires, and with several processes sharing the durable (replicas
    of a stage) the messages are split between their pulls, so each lingered for the whole
    wait: two store-writers of 16-message batches stored 17 images/s where one stored 110.
    So it lingers for the first message only, then asks for as many more as that message's
    metadata says are waiting (``num_pending``), for at most ``MORE_WAIT``.
    """

    def __init__(self, sub: JetStreamContext.PullSubscription) -> None:
        self._sub = sub

    @classmethod
    async def bind(cls, js: JetStreamContext, durable: str, stream: str) -> PullEngine:
        return cls(await js.pull_subscribe_bind(durable, stream))

    async def fetch(self, batch: int, wait: float) -> Sequence[Msg]:
        with nats_errors("fetch failed"):
            try:
                first = await self._sub.fetch(1, timeout=wait)
            except (NatsTimeoutError, TimeoutError):
                return []  # an answer, not a failure: nothing came within ``wait``
            waiting = min(batch - len(first), _pending_after(first))
            if waiting <= 0:
                return first
            try:
                more = await self._sub.fetch(waiting, timeout=MORE_WAIT)
            except (NatsTimeoutError, TimeoutError):
                more = []  # another process took them meanwhile
            return [*first, *more]

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


def _pending_after(msgs: Sequence[Msg]) -> int:
    """How many messages the consumer had waiting after the last of ``msgs``."""
    if not msgs:
        return 0
    try:
        return int(msgs[-1].metadata.num_pending or 0)
    except (AttributeError, ValueError):  # not a JetStream message: no count to go by
        return 0
