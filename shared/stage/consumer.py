"""One durable pull-consumer loop for every stage.

Workers fetch up to ``batch`` messages at a time through an ``Engine``,
decode each against the stream's contract (``delivery``: a forged or malformed message
never reaches the handler), hand the stage's handler the batch of ``Delivery`` records
while sending in-progress acks (so slow work is not redelivered), and settle each
message as ``disposition`` decides from its ``Outcome``. An outcome's ``after_ack``
step runs only once the ack went through: that is where consumed blobs are deleted.

Dead-lettering publishes the original headers and body to ``dicomflow.dlq.<stage>``
with the reason, and only then terminates the original: a dead-letter publish that
fails is tried again until it goes through, so nothing is lost in between. A stage
whose input is plaintext gives a ``letter`` hook that turns the message into what is
dead-lettered instead (the encryptor seals it: ``Letter``), and whose ``after`` step
runs once the original is terminated (deleting the plaintext blob). The hook sees the
delivery when its headers decoded, and a message whose headers break the contract is
dead-lettered with its body dropped (``dropped``).

A failure for want of NATS or storage (an ``Outage``: ``BrokerUnavailable``,
``StorageUnavailable``) is first tried again in place for ``consumer.outage_grace``
seconds (``_ride_out``; for the handler, the deliveries of a batch that failed so are
handed again): an outage of seconds does not spend the message's deliveries.

Every stage's metrics are counted here, once: messages and bytes by outcome, handling
time, redeliveries, dead letters, and the lag of the stage's durable consumer (pending
and unacknowledged messages, polled every ``LAG_INTERVAL`` seconds). Each message is
handled in a span continuing the trace of its ``traceparent`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

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
from dicomflow.shared.nats.errormap import RETRY_LATER, nats_errors
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.stage.budget import ByteBudget
from dicomflow.shared.stage.delivery import (
    AfterAck,
    BatchHandler,
    Decoder,
    Delivery,
    Outcome,
    R,
)
from dicomflow.shared.stage.disposition import Action, Disposition, backoff, decide
from dicomflow.shared.stage.engine import Engine, PullEngine
from dicomflow.shared.telemetry.bundle import Telemetry
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, RetentionPolicy
from opentelemetry.trace import Span, SpanKind, StatusCode

log = logging.getLogger(__name__)

T = TypeVar("T")
Gate = Callable[[asyncio.Event], Awaitable[None]]  # returns when fetching may go on
EngineFactory = Callable[[], Awaitable[Engine]]

__all__ = ["AfterAck", "Consumer", "Gate", "Letter", "LetterHook", "dropped"]


@dataclass(frozen=True, slots=True)
class Letter:
    """What a stage's ``letter`` hook dead-letters in place of the message it consumed:
    ``headers`` and ``data`` replace the original's, ``note`` is added to the reason,
    and ``after`` runs once the original was terminated (best effort)."""

    headers: dict[str, str]
    data: bytes
    note: str = ""
    after: AfterAck | None = None


LetterHook = Callable[[Delivery[R]], Awaitable[Letter]]


def dropped(headers: dict[str, str], note: str, after: AfterAck | None = None) -> Letter:
    """A headers-only letter: no body, and no blob named (the sweeper may then remove a
    blob no other message names)."""
    kept = {k: v for k, v in headers.items() if k != messages.H_BLOB}
    kept[H_DLQ_BODY] = "dropped"
    return Letter(kept, b"", note, after)


OUTAGES = (Outage,)  # retried in place (``_ride_out``)
LAG_INTERVAL = 5.0
LEFTOVER_INTERVAL = 60.0


@dataclass(slots=True)
class _Received(Generic[R]):
    """One fetched message on its way through ``process``."""

    msg: Msg
    delivered: int
    size: int
    span: Span
    heartbeat: asyncio.Task[None]
    delivery: Delivery[R] | None = None
    outcome: Outcome = field(default_factory=Outcome)


class Consumer(Generic[R]):
    def __init__(
        self,
        js: JetStreamContext,
        *,
        stage: str,
        stream: str,
        durable: str,
        decoder: Decoder[R],
        handler: BatchHandler[R],
        settings: ConsumerSettings,
        telemetry: Telemetry,
        gate: Gate | None = None,
        letter: LetterHook[R] | None = None,
        dead_letters: JetStreamContext | None = None,
        batch: int = 1,
        engine: EngineFactory | None = None,
    ) -> None:
        """``decoder`` turns each message into what ``handler`` is handed (``delivery``).
        ``gate``, if given, is awaited (with the stop event) before every fetch: while
        it holds, messages stay in the stream, spending none of their deliveries.
        ``letter``, if given, makes what is dead-lettered from each message (``Letter``).
        ``dead_letters``: the JetStream holding the DLQ, if not ``js``'s (a hybrid edge's
        scu-gateway consumes in the EDGE account, its DLQ is in LOCAL). ``batch``: the
        most messages handed to ``handler`` at once. ``engine``: makes the pull engine
        (default: a pull subscription bound to ``durable``)."""
        if batch < 1:
            raise ValueError("a consumer's batch must be at least 1")
        self._js = js
        self._dlq_js = dead_letters or js
        self._gate = gate
        self._letter = letter
        self._stage = stage
        self._stream = stream
        self._durable = durable
        self._decoder = decoder
        self._handler = handler
        self._batch = batch
        self._engine_factory = engine or (lambda: PullEngine.bind(js, durable, stream))
        self._engine: Engine | None = None
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
        """Process messages until ``stop`` is set; in-flight messages finish first.

        One fetcher reads the pull subscription and hands each batch to a task of its
        own, at most ``consumer.concurrency`` batches at once. Not one fetching worker
        per slot: workers sharing the subscription's inbox took each other's messages
        and end-of-request statuses, and with batches of 16 a message waited up to the
        fetch timeout (a second) for a worker to read it."""
        engine = await self._engine_factory()
        self._engine = engine
        lag = asyncio.create_task(self._watch_lag(stop), name=f"{self._stage}-lag")
        slots = asyncio.Semaphore(self._settings.concurrency)
        working: set[asyncio.Task[list[Action]]] = set()
        failed: list[BaseException] = []  # a bug in the loop stops the stage, as before

        def finished(task: asyncio.Task[list[Action]]) -> None:
            working.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                failed.append(task.exception())  # type: ignore[arg-type]

        try:
            while not stop.is_set():
                await slots.acquire()
                if failed:
                    raise failed[0]
                if stop.is_set():  # stopped while every slot was busy: fetch no more
                    slots.release()
                    break
                try:
                    msgs = await self._fetch(engine, stop)
                except BaseException:
                    slots.release()
                    raise
                if not msgs:
                    slots.release()
                    continue
                task = asyncio.create_task(self.process(msgs, stop), name=f"{self._stage}-batch")
                working.add(task)
                task.add_done_callback(finished)
            await asyncio.gather(*working)
        finally:
            lag.cancel()
            for task in working:
                task.cancel()
            await engine.close()

    async def _fetch(self, engine: Engine, stop: asyncio.Event) -> Sequence[Msg]:
        """The next batch ([] if none came, the gate held or the stage is stopping)."""
        if self._gate is not None:
            await self._gate(stop)
            if stop.is_set():
                return []
        try:
            return await engine.fetch(self._batch, wait=1.0)
        except BrokerUnavailable as exc:
            log.warning("%s, retrying", exc)
            await _sleep_unless(stop, 1.0)
            return []

    async def process(self, msgs: Sequence[Msg], stop: asyncio.Event) -> list[Action]:
        """Decode, handle and settle ``msgs`` (one batch); return what became of each.

        Each message has a span of its own continuing its ``traceparent`` (a new trace
        without one: never nested under another delivery's span), and in-progress acks
        from the moment it is fetched until it is settled: while it waits for the byte
        budget, is handled, and while an ack or a dead-letter publish rides out an
        outage (stopped before a nak).
        """
        engine = self._engine or await self._bind_engine()
        start = time.perf_counter()
        received: list[_Received[R]] = []
        actions: list[Action] = []
        try:
            for msg in msgs:
                delivered = msg.metadata.num_delivered
                span = self._tracing.start(
                    self._stage,
                    parent=(msg.headers or {}).get(H_TRACEPARENT, ""),
                    kind=SpanKind.CONSUMER,
                    attributes={"dicomflow.stage": self._stage, "dicomflow.delivery": delivered},
                )
                heartbeat = asyncio.create_task(self._keep_alive(engine, msg))
                received.append(_Received(msg, delivered, _declared_size(msg), span, heartbeat))
            actions = await self._handle_and_settle(engine, received, stop)
        finally:
            for item in received:
                item.heartbeat.cancel()
            for item, action in itertools.zip_longest(received, actions):
                if action is not None:
                    item.span.set_attribute("dicomflow.outcome", action.value)
                if action is not Action.ACK:
                    item.span.set_status(StatusCode.ERROR)
                item.span.end()
        m, stage = self._metrics, self._stage
        elapsed = time.perf_counter() - start
        for item, action in zip(received, actions, strict=True):
            m.instances.labels(stage, action.value).inc()
            m.bytes.labels(stage, action.value).inc(item.size)
            m.handle_seconds.labels(stage, action.value).observe(elapsed)
            if item.delivered > 1:
                m.redeliveries.labels(stage).inc()
        return actions

    async def _bind_engine(self) -> Engine:
        self._engine = await self._engine_factory()
        return self._engine

    async def _handle_and_settle(
        self, engine: Engine, received: list[_Received[R]], stop: asyncio.Event
    ) -> list[Action]:
        # The contract first: a forged or malformed message never reaches the handler.
        ready: list[_Received[R]] = []
        for item in received:
            try:
                decoded = self._decoder(item.msg)
            except Exception as exc:  # noqa: BLE001 (mapped by disposition.decide)
                item.outcome = Outcome(error=exc)
                continue
            item.delivery = Delivery(
                decoded.record, decoded.body, item.delivered, item.msg, item.span
            )
            if decoded.error is not None:
                item.outcome = Outcome(error=decoded.error)
            else:
                ready.append(item)
        if ready:
            # Held in groups that fit the budget, a larger body alone, so that a batch
            # of large bodies is not all worked at once.
            await asyncio.gather(*(self._handle_held(group, stop) for group in self._groups(ready)))
        outcomes = [decide(item.outcome.error, item.delivered, self._settings) for item in received]
        for item, outcome in zip(received, outcomes, strict=True):
            if outcome.action is Action.NAK:
                item.heartbeat.cancel()
                log.warning(
                    "%s: transient failure (delivery %d), retrying in %.1fs: %s",
                    self._stage,
                    item.delivered,
                    outcome.delay,
                    outcome.reason,
                    exc_info=None
                    if isinstance(item.outcome.error, DicomflowError)
                    else item.outcome.error,
                )
        # Settled together: the acks of a batch go out in one write and their
        # confirmations are awaited together (each still ridden out on its own).
        await asyncio.gather(
            *(
                self._settle(engine, item, outcome, stop)
                for item, outcome in zip(received, outcomes, strict=True)
            )
        )
        actions = [outcome.action for outcome in outcomes]
        await asyncio.gather(
            *(
                after()
                for item, action in zip(received, actions, strict=True)
                if action is Action.ACK and (after := item.outcome.after_ack) is not None
            )
        )
        return actions

    def _groups(self, ready: list[_Received[R]]) -> list[list[_Received[R]]]:
        """``ready`` cut, in order, into groups whose declared sizes fit the byte budget
        (a body larger than the budget forms a group of its own)."""
        groups: list[list[_Received[R]]] = []
        group: list[_Received[R]] = []
        total = 0
        for item in ready:
            size = max(item.size, 1)
            if group and total + size > self._budget.limit:
                groups.append(group)
                group, total = [], 0
            group.append(item)
            total += size
        if group:
            groups.append(group)
        return groups

    async def _handle_held(self, group: list[_Received[R]], stop: asyncio.Event) -> None:
        async with self._budget.hold(sum(item.size for item in group)):
            await self._handle(group, stop)

    async def _handle(self, ready: list[_Received[R]], stop: asyncio.Event) -> None:
        """Hand ``ready`` to the handler; the deliveries that failed for want of NATS or
        storage are handed again in place, for up to ``consumer.outage_grace`` seconds
        with backoff, the heartbeats keeping them ours meanwhile, and no longer once
        ``stop`` is set (see ``_ride_out``)."""
        deadline = time.monotonic() + self._settings.outage_grace
        tries = 0
        pending = ready
        while True:
            batch = [item.delivery for item in pending if item.delivery is not None]
            try:
                outcomes = list(await self._handler(batch))
            except Exception as exc:  # noqa: BLE001 (mapped by disposition.decide)
                outcomes = [Outcome(error=exc)] * len(pending)
            if len(outcomes) != len(pending):
                wrong = RuntimeError(
                    f"the handler answered {len(outcomes)} outcome(s) for {len(batch)} deliveries"
                )
                outcomes = [Outcome(error=wrong)] * len(pending)
            for item, outcome in zip(pending, outcomes, strict=True):
                item.outcome = outcome
            failed = [item for item in pending if isinstance(item.outcome.error, OUTAGES)]
            if not failed:
                return
            tries += 1
            delay = backoff(tries, self._settings)
            if stop.is_set() or time.monotonic() + delay > deadline:
                return
            log.warning(
                "%s: handling failed (%s), trying again in %.1fs; the message is kept",
                self._stage,
                failed[0].outcome.error,
                delay,
            )
            self._metrics.outage_retries.labels(self._stage).inc(len(failed))
            await _sleep_unless(stop, delay)
            pending = failed

    async def _settle(
        self,
        engine: Engine,
        item: _Received[R],
        outcome: Disposition,
        stop: asyncio.Event,
    ) -> None:
        msg, error = item.msg, item.outcome.error
        try:
            if outcome.action is Action.ACK:
                # The work is done: an ack lost to a short outage would cost a delivery.
                await self._ride_out(
                    stop, "acknowledging", lambda: engine.ack(msg), self._settings.outage_grace
                )
            elif outcome.action is Action.NAK:
                await engine.nak(msg, outcome.delay)
            else:
                extra = error.dead_letter_headers() if isinstance(error, ProcessingError) else {}
                # Not settled, a message on its last delivery would get none to come and
                # stay in the stream unacknowledged: ride out an outage for as long as it
                # lasts (until the stage stops).
                after = await self._ride_out(
                    stop,
                    "dead-lettering",
                    lambda: self._dead_letter(item, outcome.reason, extra),
                    grace=None,
                )
                await engine.term(msg)
                if after is not None:
                    await after()
                permanent = isinstance(error, PermanentError)
                kind = "permanent" if permanent else "exhausted"
                self._metrics.dead_letters.labels(self._stage, kind).inc()
        except (NatsError, TimeoutError, OSError, BrokerUnavailable) as exc:
            # Not settled: JetStream redelivers after AckWait. Nothing is lost.
            log.warning("%s: could not settle message (%s): %r", self._stage, outcome.action, exc)
        finally:
            item.heartbeat.cancel()

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
        self, item: _Received[R], reason: str, extra: dict[str, str]
    ) -> AfterAck | None:
        """Publish the dead letter; return the ``letter`` hook's ``after`` step."""
        log.error("%s: dead-lettering message: %s", self._stage, reason)
        msg = item.msg
        headers = dict(msg.headers or {})
        data = msg.data
        after: AfterAck | None = None
        if self._letter is not None:
            if item.delivery is None:
                letter = dropped(headers, "body not kept: its headers break the contract")
            else:
                try:
                    letter = await self._letter(item.delivery)
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
                H_DLQ_DELIVERIES: str(item.delivered),
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
                with nats_errors("consumer info unavailable"):
                    info = await self._js.consumer_info(self._stream, self._durable, timeout=5.0)
            except RETRY_LATER as exc:
                log.debug("%s: %s", self._stage, exc)
            else:
                pending.set(info.num_pending or 0)
                ack_pending.set(info.num_ack_pending or 0)
                if self._work_queue and time.monotonic() >= self._next_leftover_check:
                    self._next_leftover_check = time.monotonic() + LEFTOVER_INTERVAL
                    try:
                        with nats_errors("leftover check failed"):
                            await self._remove_acked_leftovers(info)
                    except RETRY_LATER as exc:
                        log.debug("%s: %s", self._stage, exc)
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

    async def _keep_alive(self, engine: Engine, msg: Msg) -> None:
        interval = max(self._settings.ack_wait / 3, 0.5)
        while True:
            await asyncio.sleep(interval)
            await engine.in_progress(msg)


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
