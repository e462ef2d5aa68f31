"""The byte budget: large bodies queue, none is starved, an oversize one runs alone."""

from __future__ import annotations

import asyncio

import pytest
from dicomflow.shared.stage.budget import ByteBudget


async def test_work_beyond_the_budget_waits_its_turn() -> None:
    budget = ByteBudget(100)
    peak = 0
    running = 0

    async def job(size: int) -> None:
        nonlocal peak, running
        async with budget.hold(size):
            running += size
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= size

    await asyncio.gather(*(job(40) for _ in range(10)))
    assert peak == 80  # two at a time fit, a third would exceed 100
    assert budget.used == 0


async def test_oversize_body_takes_the_whole_budget_and_runs_alone() -> None:
    budget = ByteBudget(100)
    async with budget.hold(10_000):
        assert budget.used == 100
        small = asyncio.create_task(_hold(budget, 1))
        await asyncio.sleep(0.01)
        assert not small.done()
    await asyncio.wait_for(small, 1)


async def _hold(budget: ByteBudget, size: int) -> None:
    async with budget.hold(size):
        pass


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ByteBudget(0)
