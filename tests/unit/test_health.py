"""A destination's up/down state: held while unreachable, resumed when a C-ECHO answers.

The C-ECHO is a fake here; tests/integration/test_forwarding.py drives the same gate
against a real Orthanc that is stopped for longer than the retry budget.
"""

from __future__ import annotations

import asyncio

import pytest
from dicomflow.scu_gateway.health import DestinationHealth
from dicomflow.scu_gateway.status import DeliveryRefused, DestinationUnreachable

INTERVAL = 0.01


class Echoes:
    """Answers each C-ECHO from ``outcomes`` in turn (an exception is raised), then 0."""

    def __init__(self, *outcomes: int | Exception) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        outcome = self.outcomes.pop(0) if self.outcomes else 0x0000
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def unreachable() -> DestinationUnreachable:
    return DestinationUnreachable("cannot associate with PEER: connection refused")


async def held(health: DestinationHealth, stop: asyncio.Event, seconds: float) -> bool:
    """Whether ``wait_up`` is still waiting after ``seconds``."""
    try:
        await asyncio.wait_for(health.wait_up(stop), seconds)
    except TimeoutError:
        return True
    return False


async def test_held_while_unreachable_then_resumes_when_a_c_echo_answers() -> None:
    echo = Echoes(unreachable(), unreachable(), unreachable())
    changes: list[bool] = []
    health = DestinationHealth("PEER", echo, INTERVAL, on_change=changes.append)
    stop = asyncio.Event()
    assert health.is_up and not await held(health, stop, 0.5)

    health.down("connection refused")
    health.down("connection refused again")  # one transition, one probe
    assert not health.is_up
    await asyncio.wait_for(health.wait_up(stop), 5)
    assert health.is_up
    assert echo.calls == 4  # three failed probes, then the one that answered
    assert changes == [True, False, True]
    await health.close()


async def test_an_unforeseen_probe_failure_does_not_end_the_probing() -> None:
    echo = Echoes(RuntimeError("pynetdicom: association not established"), unreachable())
    health = DestinationHealth("PEER", echo, INTERVAL)
    health.down("connection refused")
    await asyncio.wait_for(health.wait_up(asyncio.Event()), 5)
    assert echo.calls == 3
    await health.close()


async def test_a_refusing_peer_is_reachable() -> None:
    """An association rejected for good still came from the peer: its C-STOREs will be
    refused and dead-lettered with the reason, never held forever."""
    echo = Echoes(DeliveryRefused("PEER rejected the association: calling AE not recognised"))
    health = DestinationHealth("PEER", echo, INTERVAL)
    health.down("no response")
    await asyncio.wait_for(health.wait_up(asyncio.Event()), 5)
    assert echo.calls == 1
    await health.close()


async def test_stop_releases_a_held_consumer() -> None:
    health = DestinationHealth("PEER", Echoes(*[unreachable()] * 1000), INTERVAL)
    health.down("connection refused")
    stop = asyncio.Event()
    assert await held(health, stop, 0.2)
    waiter = asyncio.create_task(health.wait_up(stop))
    stop.set()
    await asyncio.wait_for(waiter, 5)
    assert not health.is_up
    await health.close()


async def test_start_up_check_holds_an_unreachable_destination(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = DestinationHealth("PEER", Echoes(unreachable(), *[unreachable()] * 1000), INTERVAL)
    await health.check()
    assert not health.is_up
    assert await held(health, asyncio.Event(), 0.2)
    assert "C-ECHO to PEER failed" in caplog.text
    assert "PEER unreachable" in caplog.text
    await health.close()


async def test_start_up_check_of_a_reachable_destination() -> None:
    for answer in (0x0000, DeliveryRefused("no Verification context accepted")):
        health = DestinationHealth("PEER", Echoes(answer), INTERVAL)
        await health.check()
        assert health.is_up
        await health.close()
