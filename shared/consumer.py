"""One durable pull-consumer loop for every stage.

Workers fetch one message at a time, run the stage's handler while sending in-progress
acks (so slow work is not redelivered), and settle the message as ``disposition``
decides. A handler returns an optional ``after_ack`` coroutine function, run only once
the ack went through: that is where consumed blobs are deleted.

Dead-lettering publishes the original headers and body to ``dicomflow.dlq.<stage>``
with the reason, and only then terminates the original: if the dead-letter publish
fails the message is nak'ed and comes back, so it is never lost in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext

from dicomflow.shared import subjects
from dicomflow.shared.budget import ByteBudget
from dicomflow.shared.disposition import Action, Disposition, decide
from dicomflow.shared.errors import DicomflowError, ProcessingError
from dicomflow.shared.messages import H_SEALED_SIZE, H_SIZE
from dicomflow.shared.settings import ConsumerSettings

log = logging.getLogger(__name__)

AfterAck = Callable[[], Awaitable[None]]
Handler = Callable[[Msg], Awaitable[AfterAck | None]]

H_DLQ_REASON = "Dicomflow-Dlq-Reason"
H_DLQ_STAGE = "Dicomflow-Dlq-Stage"
H_DLQ_SUBJECT = "Dicomflow-Dlq-Subject"
H_DLQ_DELIVERIES = "Dicomflow-Dlq-Deliveries"
H_DLQ_STREAM_SEQ = "Dicomflow-Dlq-Stream-Seq"


class Consumer:
    def __init__(
        self,
        js: JetStreamContext,
        *,
        stage: str,
        stream: str,
        durable: str,
        handler: Handler,
        settings: ConsumerSettings,
    ) -> None:
        self._js = js
        self._stage = stage
        self._stream = stream
        self._durable = durable
        self._handler = handler
        self._settings = settings
        self._budget = ByteBudget(settings.max_inflight_bytes)

    async def run(self, stop: asyncio.Event) -> None:
        """Process messages until ``stop`` is set; in-flight messages finish first."""
        sub = await self._js.pull_subscribe_bind(self._durable, self._stream)
        workers = [
            asyncio.create_task(self._work(sub, stop), name=f"{self._stage}-worker-{i}")
            for i in range(self._settings.concurrency)
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def _work(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            except NatsError as exc:
                log.warning("fetch failed, retrying: %r", exc)
                await _sleep_unless(stop, 1.0)
                continue
            for msg in msgs:
                await self._process(msg)

    async def _process(self, msg: Msg) -> None:
        delivered = msg.metadata.num_delivered
        heartbeat = asyncio.create_task(self._keep_alive(msg))  # also while queued
        after_ack: AfterAck | None = None
        error: BaseException | None = None
        try:
            async with self._budget.hold(_declared_size(msg)):
                after_ack = await self._handler(msg)
        except Exception as exc:  # noqa: BLE001 (every failure is mapped by disposition.decide)
            error = exc
        finally:
            heartbeat.cancel()
        outcome = decide(error, delivered, self._settings)
        if error is not None and outcome.action is Action.NAK:
            log.warning(
                "%s: transient failure (delivery %d), retrying in %.1fs: %s",
                self._stage,
                delivered,
                outcome.delay,
                outcome.reason,
                exc_info=None if isinstance(error, DicomflowError) else error,
            )
        await self._settle(msg, outcome, delivered, error)
        if outcome.action is Action.ACK and after_ack is not None:
            await after_ack()

    async def _settle(
        self, msg: Msg, outcome: Disposition, delivered: int, error: BaseException | None
    ) -> None:
        try:
            if outcome.action is Action.ACK:
                await msg.ack_sync(timeout=10.0)
            elif outcome.action is Action.NAK:
                await msg.nak(delay=outcome.delay)
            else:
                extra = error.dead_letter_headers() if isinstance(error, ProcessingError) else {}
                await self._dead_letter(msg, outcome.reason, delivered, extra)
                await msg.term()
        except (NatsError, TimeoutError) as exc:
            # Not settled: JetStream redelivers after AckWait. Nothing is lost.
            log.warning("%s: could not settle message (%s): %r", self._stage, outcome.action, exc)

    async def _dead_letter(
        self, msg: Msg, reason: str, delivered: int, extra: dict[str, str]
    ) -> None:
        log.error("%s: dead-lettering message: %s", self._stage, reason)
        headers = dict(msg.headers or {})
        headers.pop("Nats-Msg-Id", None)
        seq = msg.metadata.sequence.stream
        headers.update(
            {
                H_DLQ_REASON: reason[:1000],
                H_DLQ_STAGE: self._stage,
                H_DLQ_SUBJECT: msg.subject,
                H_DLQ_DELIVERIES: str(delivered),
                H_DLQ_STREAM_SEQ: str(seq),
                "Nats-Msg-Id": f"{self._stage}:{self._stream}:{seq}",
                **extra,
            }
        )
        await self._js.publish(
            subjects.dlq_subject(self._stage), msg.data, headers=headers, timeout=10.0
        )

    async def _keep_alive(self, msg: Msg) -> None:
        interval = max(self._settings.ack_wait / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(NatsError, TimeoutError):
                await msg.in_progress()


def _declared_size(msg: Msg) -> int:
    """The body size the headers announce (validated later by the handler)."""
    headers = msg.headers or {}
    raw = headers.get(H_SEALED_SIZE) or headers.get(H_SIZE) or ""
    return int(raw) if raw.isdigit() else len(msg.data)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
