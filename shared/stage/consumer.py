"""One durable pull-consumer loop for every stage.

Workers fetch one message at a time, run the stage's handler while sending in-progress
acks (so slow work is not redelivered), and settle the message as ``disposition``
decides. A handler returns an optional ``after_ack`` coroutine function, run only once
the ack went through: that is where consumed blobs are deleted.

Dead-lettering publishes the original headers and body to ``dicomflow.dlq.<stage>``
with the reason, and only then terminates the original: a dead-letter publish that
fails is tried again until it goes through, so nothing is lost in between. A stage
whose input is plaintext gives a ``letter`` hook that turns the message into what is
dead-lettered instead (the encryptor seals it: ``Letter``), and whose ``after`` step
runs once the original is terminated (deleting the plaintext blob).

A failure for want of NATS or storage (an ``Outage``: ``BrokerUnavailable``,
``StorageUnavailable``) is first tried again in place for ``consumer.outage_grace``
seconds (``_ride_out``):
an outage of seconds does not spend the message's deliveries.

Every stage's metrics are counted here, once: messages and bytes by outcome, handling
time, redeliveries, dead letters, and the lag of the stage's durable consumer (pending
and unacknowledged messages, polled every ``LAG_INTERVAL`` seconds). Each message is
handled in a span continuing the trace of its ``traceparent`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.deadletters import (
    H_DLQ_BODY,
    H_DLQ_DELIVERIES,
    H_DLQ_REASON,
    H_DLQ_STAGE,
    H_DLQ_STREAM_SEQ,
    H_DLQ_SUBJECT,
)
from dicomflow.shared.contracts.messages import H_SEALED_SIZE, H_SIZE, H_TRACEPARENT
from dicomflow.shared.errors import (
    BrokerUnavailable,
    DicomflowError,
    Outage,
    PermanentError,
    ProcessingError,
)
from dicomflow.shared.nats.errormap import nats_errors
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.stage.budget import ByteBudget
from dicomflow.shared.stage.disposition import Action, Disposition, backoff, decide
from dicomflow.shared.telemetry.bundle import Telemetry
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, RetentionPolicy
from opentelemetry.trace import SpanKind, StatusCode

log = logging.getLogger(__name__)

T = TypeVar("T")
AfterAck = Callable[[], Awaitable[None]]
Handler = Callable[[Msg], Awaitable[AfterAck | None]]
Gate = Callable[[asyncio.Event], Awaitable[None]]  # returns when fetching may go on


@dataclass(frozen=True, slots=True)
class Letter:
    """What a stage's ``letter`` hook dead-letters in place of the message it consumed:
    ``headers`` and ``data`` replace the original's, ``note`` is added to the reason,
    and ``after`` runs once the original was terminated (best effort)."""

    headers: dict[str, str]
    data: bytes
    note: str = ""
    after: AfterAck | None = None


LetterHook = Callable[[Msg], Awaitable[Letter]]


def dropped(headers: dict[str, str], note: str, after: AfterAck | None = None) -> Letter:
    """A headers-only letter: no body, and no blob named (the sweeper may then remove a
    blob no other message names)."""
    kept = {k: v for k, v in headers.items() if k != messages.H_BLOB}
    kept[H_DLQ_BODY] = "dropped"
    return Letter(kept, b"", note, after)


OUTAGES = (Outage,)  # retried in place (``_ride_out``)
LAG_INTERVAL = 5.0
LEFTOVER_INTERVAL = 60.0


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
        telemetry: Telemetry,
        gate: Gate | None = None,
        letter: LetterHook | None = None,
        dead_letters: JetStreamContext | None = None,
    ) -> None:
        """``gate``, if given, is awaited (with the stop event) before every fetch: while
        it holds, messages stay in the stream, spending none of their deliveries.
        ``letter``, if given, makes what is dead-lettered from each message (``Letter``).
        ``dead_letters``: the JetStream holding the DLQ, if not ``js``'s (a hybrid edge's
        scu-gateway consumes in the EDGE account, its DLQ is in LOCAL)."""
        self._js = js
        self._dlq_js = dead_letters or js
        self._gate = gate
        self._letter = letter
        self._stage = stage
        self._stream = stream
        self._durable = durable
        self._handler = handler
        self._settings = settings
        self._budget = ByteBudget(settings.max_inflight_bytes)
        self._metrics = telemetry.metrics
        self._tracing = telemetry.tracing
        self._metrics.consumer_stage(stage)
        self._settled_floor = 0  # ack floor below which the stream was last cleared
        self._work_queue = True  # until the stream says otherwise
        self._next_leftover_check = 0.0

    @property
    def stream(self) -> str:
        """The stream this consumer drains."""
        return self._stream

    async def run(self, stop: asyncio.Event) -> None:
        """Process messages until ``stop`` is set; in-flight messages finish first."""
        sub = await self._js.pull_subscribe_bind(self._durable, self._stream)
        workers = [
            asyncio.create_task(self._work(sub, stop), name=f"{self._stage}-worker-{i}")
            for i in range(self._settings.concurrency)
        ]
        lag = asyncio.create_task(self._watch_lag(stop), name=f"{self._stage}-lag")
        try:
            await asyncio.gather(*workers)
        finally:
            lag.cancel()
            for worker in workers:
                worker.cancel()
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def _work(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self._gate is not None:
                await self._gate(stop)
                if stop.is_set():
                    return
            try:
                msgs = await sub.fetch(1, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            except NatsError as exc:
                log.warning("fetch failed, retrying: %r", exc)
                await _sleep_unless(stop, 1.0)
                continue
            for msg in msgs:
                await self._process(msg, stop)

    async def _process(self, msg: Msg, stop: asyncio.Event) -> None:
        delivered = msg.metadata.num_delivered
        size = _declared_size(msg)
        start = time.perf_counter()
        parent = (msg.headers or {}).get(H_TRACEPARENT, "")
        with self._tracing.span(
            self._stage,
            parent=parent,
            kind=SpanKind.CONSUMER,
            attributes={"dicomflow.stage": self._stage, "dicomflow.delivery": delivered},
        ) as span:
            outcome = await self._handle_and_settle(msg, delivered, size, stop)
            span.set_attribute("dicomflow.outcome", outcome.value)
            if outcome is not Action.ACK:
                span.set_status(StatusCode.ERROR)
        m, stage = self._metrics, self._stage
        m.instances.labels(stage, outcome.value).inc()
        m.bytes.labels(stage, outcome.value).inc(size)
        m.handle_seconds.labels(stage, outcome.value).observe(time.perf_counter() - start)
        if delivered > 1:
            m.redeliveries.labels(stage).inc()

    async def _handle_and_settle(
        self, msg: Msg, delivered: int, size: int, stop: asyncio.Event
    ) -> Action:
        # In-progress acks while queued for the budget, while handling, and while an ack
        # or a dead-letter publish rides out an outage; stopped before a nak.
        heartbeat = asyncio.create_task(self._keep_alive(msg))
        after_ack: AfterAck | None = None
        error: BaseException | None = None
        try:
            try:
                # The contract first: a forged or malformed message never reaches the handler.
                messages.check_delivery(self._stream, msg.headers, msg.data)
                async with self._budget.hold(size):
                    after_ack = await self._ride_out(
                        stop, "handling", lambda: self._handler(msg), self._settings.outage_grace
                    )
            except Exception as exc:  # noqa: BLE001 (every failure is mapped by disposition.decide)
                error = exc
            outcome = decide(error, delivered, self._settings)
            if outcome.action is Action.NAK:
                heartbeat.cancel()
                log.warning(
                    "%s: transient failure (delivery %d), retrying in %.1fs: %s",
                    self._stage,
                    delivered,
                    outcome.delay,
                    outcome.reason,
                    exc_info=None if isinstance(error, DicomflowError) else error,
                )
            await self._settle(msg, outcome, delivered, error, stop)
        finally:
            heartbeat.cancel()
        if outcome.action is Action.ACK and after_ack is not None:
            await after_ack()
        return outcome.action

    async def _settle(
        self,
        msg: Msg,
        outcome: Disposition,
        delivered: int,
        error: BaseException | None,
        stop: asyncio.Event,
    ) -> None:
        try:
            if outcome.action is Action.ACK:
                # The work is done: an ack lost to a short outage would cost a delivery.
                await self._ride_out(
                    stop, "acknowledging", lambda: _ack(msg), self._settings.outage_grace
                )
            elif outcome.action is Action.NAK:
                with nats_errors("nak failed"):
                    await msg.nak(delay=outcome.delay)
            else:
                extra = error.dead_letter_headers() if isinstance(error, ProcessingError) else {}
                # Not settled, a message on its last delivery would get none to come and
                # stay in the stream unacknowledged: ride out an outage for as long as it
                # lasts (until the stage stops).
                after = await self._ride_out(
                    stop,
                    "dead-lettering",
                    lambda: self._dead_letter(msg, outcome.reason, delivered, extra),
                    grace=None,
                )
                with nats_errors("term failed"):
                    await msg.term()
                if after is not None:
                    await after()
                permanent = isinstance(error, PermanentError)
                kind = "permanent" if permanent else "exhausted"
                self._metrics.dead_letters.labels(self._stage, kind).inc()
        except (NatsError, TimeoutError, BrokerUnavailable) as exc:
            # Not settled: JetStream redelivers after AckWait. Nothing is lost.
            log.warning("%s: could not settle message (%s): %r", self._stage, outcome.action, exc)

    async def _ride_out(
        self,
        stop: asyncio.Event,
        what: str,
        attempt: Callable[[], Awaitable[T]],
        grace: float | None,
    ) -> T:
        """``attempt()``, tried again in place while it fails for want of NATS or storage,
        for up to ``grace`` seconds (None: no limit) with backoff, the heartbeat keeping
        the message ours meanwhile, and no longer once ``stop`` is set.

        A leader election in a NATS cluster or an object store restarting takes seconds;
        naking at each failure would spend the message's deliveries on it, and a few such
        seconds in a row would dead-letter an instance that was never poison (the fault
        suite's cluster scenario did). Deliveries are for the message's own failures.
        """
        deadline = None if grace is None else time.monotonic() + grace
        tries = 0
        while True:
            try:
                return await attempt()
            except OUTAGES as exc:
                tries += 1
                delay = backoff(tries, self._settings)
                if stop.is_set() or (deadline is not None and time.monotonic() + delay > deadline):
                    raise
                log.warning(
                    "%s: %s failed (%s), trying again in %.1fs; the message is kept",
                    self._stage,
                    what,
                    exc,
                    delay,
                )
                self._metrics.outage_retries.labels(self._stage).inc()
                await _sleep_unless(stop, delay)

    async def _dead_letter(
        self, msg: Msg, reason: str, delivered: int, extra: dict[str, str]
    ) -> AfterAck | None:
        """Publish the dead letter; return the ``letter`` hook's ``after`` step."""
        log.error("%s: dead-lettering message: %s", self._stage, reason)
        headers = dict(msg.headers or {})
        data = msg.data
        after: AfterAck | None = None
        if self._letter is not None:
            try:
                letter = await self._letter(msg)
            except OUTAGES:
                raise  # ridden out: tried again
            except Exception as exc:  # noqa: BLE001 (the body is dropped, never kept as it was)
                log.error(  # the type only: an error's text may name the instance
                    "%s: the dead-letter hook failed (%s); the body is dropped",
                    self._stage,
                    type(exc).__name__,
                )
                letter = dropped(headers, f"body not kept: {type(exc).__name__}")
            headers, data, after = dict(letter.headers), letter.data, letter.after
            reason = f"{reason}; {letter.note}" if letter.note else reason
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
        with nats_errors("dead-letter publish failed"):
            await self._dlq_js.publish(
                subjects.dlq_subject(self._stage), data, headers=headers, timeout=10.0
            )
        return after

    async def _watch_lag(self, stop: asyncio.Event) -> None:
        """Export the durable consumer's pending and unacknowledged counts (its lag)."""
        pending = self._metrics.consumer_pending.labels(self._stage)
        ack_pending = self._metrics.consumer_ack_pending.labels(self._stage)
        while not stop.is_set():
            try:
                info = await self._js.consumer_info(self._stream, self._durable, timeout=5.0)
            except (NatsError, TimeoutError) as exc:
                log.debug("%s: consumer info unavailable: %r", self._stage, exc)
            else:
                pending.set(info.num_pending or 0)
                ack_pending.set(info.num_ack_pending or 0)
                if self._work_queue and time.monotonic() >= self._next_leftover_check:
                    self._next_leftover_check = time.monotonic() + LEFTOVER_INTERVAL
                    try:
                        await self._remove_acked_leftovers(info)
                    except (NatsError, TimeoutError) as exc:
                        log.debug("%s: leftover check failed: %r", self._stage, exc)
            await _sleep_unless(stop, LAG_INTERVAL)

    async def _remove_acked_leftovers(self, info: ConsumerInfo) -> None:
        """Work-queue streams: remove messages at or below the consumer's ack floor.

        A nats-server killed with -9 can lose a work-queue stream's deletions while it
        keeps the consumer's acks: the fault suite saw 414 instances, all acked and
        stored, reappear in INGEST after nine kills. No consumer would ever take them,
        and they would fill the bounded stream until the gateway answered 0xA700 for
        good. Everything at or below the ack floor was acked (or dead-lettered), so
        removing it loses nothing; messages above it are untouched.
        """
        floor = info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0
        if floor <= self._settled_floor:
            return
        stream = await self._js.stream_info(self._stream)
        if stream.config.retention != RetentionPolicy.WORK_QUEUE:
            self._work_queue = False  # other streams keep acked messages by design
            return
        if stream.state.first_seq and stream.state.first_seq <= floor:
            before = stream.state.messages
            subject = info.config.filter_subject if info.config else None
            await self._js.purge_stream(self._stream, seq=floor + 1, subject=subject)
            if subject is None:
                after = (await self._js.stream_info(self._stream)).state.messages
                log.warning(
                    "%s: removed about %d acknowledged message(s) that reappeared in %s "
                    "below the consumer's ack floor (after a nats-server crash)",
                    self._stage,
                    max(before - after, 0),
                    self._stream,
                )
        self._settled_floor = floor

    async def _keep_alive(self, msg: Msg) -> None:
        interval = max(self._settings.ack_wait / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(NatsError, TimeoutError):
                await msg.in_progress()


async def _ack(msg: Msg) -> None:
    with nats_errors("ack failed"):
        await msg.ack_sync(timeout=10.0)


def _declared_size(msg: Msg) -> int:
    """The body size the headers announce (validated later, against the contract).

    Only ASCII digits, at most 19: ``str.isdigit`` also accepts digits ``int`` refuses
    ("²"), and a forged header must not crash the worker before the contract check.
    """
    headers = msg.headers or {}
    raw = headers.get(H_SEALED_SIZE) or headers.get(H_SIZE) or ""
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 19:
        return int(raw)
    return len(msg.data)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
