"""A coroutine run on the event loop from an association's thread, waited for cheaply.

``asyncio.run_coroutine_threadsafe`` makes a ``concurrent.futures.Future``, chains it to
the task through callbacks on both sides and wakes the waiting thread through a
``Condition``; per C-STORE that was about a tenth of the gateway's CPU. Here the loop gets
one ``call_soon_threadsafe`` that starts the task, and the thread waits on a plain lock
that the task's done-callback releases.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class HopTimeout(Exception):
    """The coroutine did not finish in time; it has been cancelled."""


def run_on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float) -> T:
    """Run ``coro`` on ``loop`` (from another thread) and return its result, or raise
    what it raised; raise HopTimeout (and cancel it) after ``timeout`` seconds."""
    done = threading.Lock()
    done.acquire()
    started: list[asyncio.Task[T]] = []

    def start() -> None:
        task = loop.create_task(coro)
        started.append(task)
        task.add_done_callback(lambda _: done.release())

    loop.call_soon_threadsafe(start)
    if not done.acquire(timeout=timeout):
        loop.call_soon_threadsafe(_cancel, started, coro)
        raise HopTimeout(f"not done in {timeout:g} s")
    return started[0].result()


def _cancel(started: list[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any]) -> None:
    if started:
        started[0].cancel()
    else:  # never started (it runs first in the loop's FIFO, so only if start failed)
        coro.close()
