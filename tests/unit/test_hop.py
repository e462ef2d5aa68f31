"""The receiver's hop onto the event loop: result, error and timeout, on a real loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from dicomflow.scp_gateway.hop import HopTimeout, run_on_loop


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_the_result_and_the_error_of_the_coroutine_come_back(
    loop: asyncio.AbstractEventLoop,
) -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        raise ValueError("no")

    assert run_on_loop(loop, answer(), 5.0) == 42
    with pytest.raises(ValueError, match="no"):
        run_on_loop(loop, fail(), 5.0)


def test_a_coroutine_not_done_in_time_is_cancelled(loop: asyncio.AbstractEventLoop) -> None:
    cancelled = threading.Event()

    async def stuck() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(HopTimeout):
        run_on_loop(loop, stuck(), 0.05)
    assert cancelled.wait(5)
