"""The pull engine's fetch: it lingers for the first message only, then takes as many
more as are known to be waiting, never waiting for a batch to fill (with replicas of a
stage sharing a durable, lingering pulls of whole batches held each other back:
bench/ingest.py's scale-out run stored 17 images/s with two processes per stage, 105
after this)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from dicomflow.shared.stage.engine import MORE_WAIT, PullEngine
from nats.errors import TimeoutError as NatsTimeoutError


def message(pending: int) -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(num_pending=pending))


@dataclass
class Subscription:
    """Answers each fetch from a script; records (batch, timeout) of every call."""

    answers: list[list[Any] | Exception]
    calls: list[tuple[int, float]] = field(default_factory=list)

    async def fetch(self, batch: int, timeout: float) -> list[Any]:  # noqa: ASYNC109 (nats-py's)
        self.calls.append((batch, timeout))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer[:batch]


async def test_an_idle_durable_lingers_for_one_message_only() -> None:
    sub = Subscription([NatsTimeoutError()])
    assert await PullEngine(sub).fetch(16, wait=1.0) == []  # type: ignore[arg-type]
    assert sub.calls == [(1, 1.0)]


async def test_nothing_waiting_after_the_first_hands_it_over_at_once() -> None:
    first = message(pending=0)
    sub = Subscription([[first]])
    assert await PullEngine(sub).fetch(16, wait=1.0) == [first]  # type: ignore[arg-type]
    assert sub.calls == [(1, 1.0)]


@pytest.mark.parametrize(("pending", "asked"), [(3, 3), (15, 15), (400, 15)])
async def test_a_backlog_is_taken_in_one_more_pull_of_what_is_waiting(
    pending: int, asked: int
) -> None:
    first, rest = message(pending), [message(0) for _ in range(asked)]
    sub = Subscription([[first], rest])
    got = await PullEngine(sub).fetch(16, wait=1.0)  # type: ignore[arg-type]
    assert got == [first, *rest]
    assert sub.calls == [(1, 1.0), (asked, MORE_WAIT)]


async def test_messages_another_replica_took_meanwhile_are_not_waited_for() -> None:
    first = message(pending=5)
    sub = Subscription([[first], NatsTimeoutError()])
    assert await PullEngine(sub).fetch(16, wait=1.0) == [first]  # type: ignore[arg-type]
    assert sub.calls == [(1, 1.0), (5, MORE_WAIT)]
