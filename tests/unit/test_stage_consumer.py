"""The consumer loop's mapping of outcomes to ack, nak and term, on fake messages.

No server: a recording ``Engine`` stands in for the pull subscription and a recording
JetStream for the dead-letter stream (the same loop on a real nats-server:
tests/integration/test_outage_grace.py, test_dead_letters.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.contracts.messages import H_TRACEPARENT
from dicomflow.shared.errors import (
    BrokerUnavailable,
    ContractViolation,
    PermanentError,
    TransientError,
)
from dicomflow.shared.settings import ConsumerSettings, TelemetrySettings
from dicomflow.shared.stage import delivery
from dicomflow.shared.stage.consumer import (
    H_DLQ_BODY,
    H_DLQ_DELIVERIES,
    H_DLQ_REASON,
    H_DLQ_STAGE,
    Consumer,
    Letter,
)
from dicomflow.shared.stage.delivery import AfterAck, Decoded, Delivery, Outcome
from dicomflow.shared.stage.disposition import Action
from dicomflow.shared.telemetry.bundle import Telemetry
from dicomflow.shared.telemetry.tracing import Tracing
from nats.aio.msg import Msg

from support.stage import ingest_message, instance, received

SETTINGS = ConsumerSettings(
    concurrency=1, max_deliver=3, ack_wait=30, backoff_initial=0.01, backoff_max=0.02
)


class Engine:
    """Records what the consumer does with each message, by subject."""

    def __init__(self, fail_acks: int = 0) -> None:
        self.calls: list[tuple[str, str]] = []
        self._fail_acks = fail_acks

    async def fetch(self, batch: int, wait: float) -> Sequence[Msg]:
        return []

    async def ack(self, msg: Msg) -> None:
        if self._fail_acks:
            self._fail_acks -= 1
            raise BrokerUnavailable("ack failed: no responders")
        self.calls.append(("ack", msg.subject))

    async def nak(self, msg: Msg, delay: float) -> None:
        assert 0 < delay <= SETTINGS.backoff_max
        self.calls.append(("nak", msg.subject))

    async def in_progress(self, msg: Msg) -> None:
        self.calls.append(("wpi", msg.subject))

    async def term(self, msg: Msg) -> None:
        self.calls.append(("term", msg.subject))

    async def close(self) -> None:
        return None


class DeadLetters:
    """A JetStream that only takes dead-letter publishes."""

    def __init__(self, engine: Engine) -> None:
        self.letters: list[tuple[str, bytes, dict[str, str]]] = []
        self._engine = engine

    async def publish(self, subject: str, data: bytes, **kw: Any) -> None:
        headers: dict[str, str] = kw["headers"]
        self._engine.calls.append(("dlq", headers[H_DLQ_STAGE]))
        self.letters.append((subject, data, headers))


def consumer(
    handler: delivery.BatchHandler[Any],
    decoder: delivery.Decoder[Any] = delivery.raw,
    *,
    settings: ConsumerSettings = SETTINGS,
    letter: Any = None,
    fail_acks: int = 0,
    telemetry: Telemetry | None = None,
) -> tuple[Consumer[Any], Engine, DeadLetters]:
    engine = Engine(fail_acks)
    dlq = DeadLetters(engine)

    async def bind() -> Engine:
        return engine

    made = Consumer(
        dlq,  # type: ignore[arg-type]
        stage="worker",
        stream="TEST",
        durable="worker",
        decoder=decoder,
        handler=handler,
        settings=settings,
        telemetry=telemetry or Telemetry.create("test"),
        letter=letter,
        engine=bind,  # type: ignore[arg-type]
    )
    return made, engine, dlq


def one(results: dict[str, Exception | None], after: list[str] | None = None) -> Any:
    """A one-at-a-time handler failing with ``results[subject]`` (None: done)."""

    async def handle(d: Delivery[Msg]) -> AfterAck | None:
        error = results[d.message.subject]
        if error is not None:
            raise error

        async def after_ack() -> None:
            if after is not None:
                after.append(d.message.subject)

        return after_ack

    return delivery.one_at_a_time(handle)


async def test_success_is_acked_then_after_ack_runs() -> None:
    order: list[str] = []
    made, engine, _ = consumer(one({"a": None}, order))
    assert await made.process([received({}, subject="a")], asyncio.Event()) == [Action.ACK]
    assert engine.calls == [("ack", "a")]
    assert order == ["a"]


async def test_transient_failure_is_naked_and_after_ack_does_not_run() -> None:
    order: list[str] = []
    made, engine, dlq = consumer(one({"a": TransientError("busy")}, order))
    assert await made.process([received({}, subject="a")], asyncio.Event()) == [Action.NAK]
    assert engine.calls == [("nak", "a")]
    assert order == []
    assert dlq.letters == []


async def test_permanent_failure_is_dead_lettered_then_terminated() -> None:
    made, engine, dlq = consumer(one({"a": PermanentError("cannot")}))
    msg = received({"X-Kept": "1"}, b"body", subject="a", delivered=1, seq=9)
    assert await made.process([msg], asyncio.Event()) == [Action.DEAD_LETTER]
    assert engine.calls == [("dlq", "worker"), ("term", "a")]
    [(subject, data, headers)] = dlq.letters
    assert subject == subjects.dlq_subject("worker")
    assert data == b"body"
    assert headers["X-Kept"] == "1"
    assert headers[H_DLQ_REASON] == "PermanentError: cannot"
    assert headers["Nats-Msg-Id"] == "worker:TEST:9"


async def test_transient_failure_on_the_last_delivery_is_dead_lettered() -> None:
    made, engine, dlq = consumer(one({"a": TransientError("busy")}))
    msg = received({}, subject="a", delivered=SETTINGS.max_deliver)
    assert await made.process([msg], asyncio.Event()) == [Action.DEAD_LETTER]
    assert engine.calls == [("dlq", "worker"), ("term", "a")]
    assert dlq.letters[0][2][H_DLQ_REASON].startswith("gave up after 3 deliveries")
    assert dlq.letters[0][2][H_DLQ_DELIVERIES] == "3"


async def test_an_outage_is_ridden_out_within_one_delivery() -> None:
    failures = [BrokerUnavailable("no responders")] * 3
    calls: list[int] = []

    async def handle(d: Delivery[Msg]) -> AfterAck | None:
        calls.append(d.attempt)
        if failures:
            raise failures.pop()
        return None

    made, engine, _ = consumer(delivery.one_at_a_time(handle), fail_acks=2)
    assert await made.process([received({}, subject="a")], asyncio.Event()) == [Action.ACK]
    assert calls == [1, 1, 1, 1]  # handled again in place, not naked
    assert engine.calls == [("ack", "a")]  # the two failed acks were ridden out too


async def test_an_outage_longer_than_the_grace_is_naked() -> None:
    async def handle(d: Delivery[Msg]) -> AfterAck | None:
        raise BrokerUnavailable("no responders")

    settings = SETTINGS.model_copy(update={"outage_grace": 0.0})
    made, engine, _ = consumer(delivery.one_at_a_time(handle), settings=settings)
    assert await made.process([received({}, subject="a")], asyncio.Event()) == [Action.NAK]
    assert engine.calls == [("nak", "a")]


async def test_a_message_breaking_its_contract_never_reaches_the_handler() -> None:
    handled: list[str] = []

    async def handle(d: Delivery[Any]) -> AfterAck | None:
        handled.append(d.message.subject)
        return None

    msg = ingest_message(instance(b"plain"), b"plai")  # one byte short of Dicomflow-Size
    made, engine, dlq = consumer(
        delivery.one_at_a_time(handle),
        delivery.ingest(None),  # type: ignore[arg-type]
    )
    assert await made.process([msg], asyncio.Event()) == [Action.DEAD_LETTER]
    assert handled == []
    assert engine.calls == [("dlq", "worker"), ("term", msg.subject)]
    assert dlq.letters[0][2][H_DLQ_REASON].startswith("ContractViolation: the inline body is 4")


async def test_the_letter_hook_replaces_the_body_and_runs_after_the_term() -> None:
    order: list[str] = []

    async def letter(d: Delivery[Msg]) -> Letter:
        async def after() -> None:
            order.append("after")

        return Letter({"Kind": "sealed", H_DLQ_BODY: "sealed"}, b"sealed", "note", after)

    made, engine, dlq = consumer(one({"a": PermanentError("cannot")}), letter=letter)
    assert await made.process([received({}, subject="a")], asyncio.Event()) == [Action.DEAD_LETTER]
    [(_, data, headers)] = dlq.letters
    assert (data, headers["Kind"], headers[H_DLQ_REASON]) == (
        b"sealed",
        "sealed",
        "PermanentError: cannot; note",
    )
    assert engine.calls == [("dlq", "worker"), ("term", "a")]
    assert order == ["after"]


async def test_headers_off_the_contract_are_dropped_not_handed_to_the_letter_hook() -> None:
    async def letter(d: Delivery[Any]) -> Letter:
        raise AssertionError("the hook gets only messages whose headers decoded")

    def decoder(msg: Msg) -> Decoded[Msg]:
        raise ContractViolation("Dicomflow-Schema is off")

    made, _, dlq = consumer(one({}), decoder, letter=letter)
    await made.process([received({"H": "v"}, b"plaintext", subject="a")], asyncio.Event())
    [(_, data, headers)] = dlq.letters
    assert data == b""
    assert headers[H_DLQ_BODY] == "dropped"
    assert headers[H_DLQ_REASON].endswith("body not kept: its headers break the contract")


async def test_a_batch_handler_settles_each_delivery_by_its_own_outcome() -> None:
    seen: list[list[str]] = []
    after: list[str] = []

    async def after_ack() -> None:
        after.append("ran")

    errors: dict[str, Exception | None] = {
        "ok": None,
        "bad": PermanentError("no"),
        "busy": TransientError("busy"),
    }

    async def handle(batch: Sequence[Delivery[Msg]]) -> Sequence[Outcome]:
        seen.append([d.message.subject for d in batch])
        # after_ack steps everywhere: only the acked delivery's may run
        return [Outcome(after_ack, errors[d.message.subject]) for d in batch]

    made, engine, _ = consumer(handle)
    msgs = [received({}, subject=s, seq=i) for i, s in enumerate(["ok", "bad", "busy"], 1)]
    got = await made.process(msgs, asyncio.Event())
    assert got == [Action.ACK, Action.DEAD_LETTER, Action.NAK]
    assert seen == [["ok", "bad", "busy"]]  # handed at once
    assert [c for c in engine.calls if c[0] != "wpi"] == [
        ("ack", "ok"),
        ("dlq", "worker"),
        ("term", "bad"),
        ("nak", "busy"),
    ]
    assert after == ["ran"]


async def test_a_batch_hands_again_only_the_deliveries_an_outage_failed() -> None:
    seen: list[list[str]] = []

    async def handle(batch: Sequence[Delivery[Msg]]) -> Sequence[Outcome]:
        seen.append([d.message.subject for d in batch])
        first = len(seen) == 1
        return [
            Outcome(error=BrokerUnavailable("down") if first and d.message.subject == "b" else None)
            for d in batch
        ]

    made, _, _ = consumer(handle)
    msgs = [received({}, subject=s, seq=i) for i, s in enumerate("ab", 1)]
    assert await made.process(msgs, asyncio.Event()) == [Action.ACK, Action.ACK]
    assert seen == [["a", "b"], ["b"]]


async def test_a_handler_answering_the_wrong_number_of_outcomes_fails_the_batch() -> None:
    async def handle(batch: Sequence[Delivery[Msg]]) -> Sequence[Outcome]:
        return []

    made, engine, _ = consumer(handle)
    assert await made.process([received({}, subject="a")], asyncio.Event()) == [Action.NAK]
    assert engine.calls == [("nak", "a")]


async def test_in_progress_acks_keep_a_slow_message() -> None:
    release = asyncio.Event()

    async def handle(d: Delivery[Msg]) -> AfterAck | None:
        await release.wait()
        return None

    settings = SETTINGS.model_copy(update={"ack_wait": 1})  # heartbeat every 0.5 s
    made, engine, _ = consumer(delivery.one_at_a_time(handle), settings=settings)
    task = asyncio.create_task(made.process([received({}, subject="a")], asyncio.Event()))
    await asyncio.sleep(1.2)
    release.set()
    assert await task == [Action.ACK]
    assert engine.calls[:2] == [("wpi", "a"), ("wpi", "a")]
    assert engine.calls[-1] == ("ack", "a")


async def test_in_progress_acks_keep_every_delivery_of_a_batch() -> None:
    release = asyncio.Event()

    async def handle(d: Delivery[Msg]) -> AfterAck | None:
        await release.wait()
        return None

    settings = SETTINGS.model_copy(update={"ack_wait": 1})  # heartbeat every 0.5 s
    made, engine, _ = consumer(delivery.concurrently(handle), settings=settings)
    batch = [received({}, subject=name, seq=i) for i, name in enumerate("abc", 1)]
    task = asyncio.create_task(made.process(batch, asyncio.Event()))
    await asyncio.sleep(0.7)
    release.set()
    assert await task == [Action.ACK] * 3
    assert sorted(engine.calls[:3]) == [("wpi", "a"), ("wpi", "b"), ("wpi", "c")]
    assert sorted(engine.calls[3:]) == [("ack", "a"), ("ack", "b"), ("ack", "c")]


async def test_each_delivery_of_a_batch_has_its_own_span_never_nested_in_another(
    tmp_path: Path,
) -> None:
    """A delivery without ``traceparent`` starts a trace of its own: in a batch it must
    not become a child of the span of the delivery before it. Inside the handler, the
    current span is the delivery's own (what the stage propagates downstream)."""
    settings = TelemetrySettings(traces="jsonl", traces_path=tmp_path)
    telemetry = Telemetry.create("worker", settings)
    seen: dict[str, str] = {}

    async def handle(d: Delivery[Msg]) -> AfterAck | None:
        seen[d.message.subject] = Tracing.traceparent()
        return None

    made, _, _ = consumer(delivery.concurrently(handle), telemetry=telemetry)
    upstream = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    batch = [
        received({}, subject="a", seq=1),
        received({H_TRACEPARENT: upstream}, subject="b", seq=2),
        received({}, subject="c", seq=3),
    ]
    assert await made.process(batch, asyncio.Event()) == [Action.ACK] * 3
    telemetry.tracing.shutdown()
    spans = [json.loads(line) for line in (tmp_path / "worker.jsonl").read_text().splitlines()]
    assert len(spans) == 3
    by_trace = {span["trace_id"]: span for span in spans}
    assert len(by_trace) == 3  # three traces: none nested in another
    b = by_trace["0af7651916cd43dd8448eb211c80319c"]
    assert b["parent_id"] == "b7ad6b7169203331"
    assert [span["parent_id"] for span in spans if span is not b] == ["", ""]
    # In the handler, each delivery's own span was current.
    assert {seen[name].split("-")[2] for name in "abc"} == {span["span_id"] for span in spans}


@pytest.mark.parametrize("batch", [0, -1])
def test_a_batch_below_one_is_refused(batch: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Consumer(
            None,  # type: ignore[arg-type]
            stage="w",
            stream="S",
            durable="w",
            decoder=delivery.raw,
            handler=one({}),
            settings=SETTINGS,
            telemetry=Telemetry.create("test"),
            batch=batch,
        )
