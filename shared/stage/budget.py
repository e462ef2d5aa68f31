"""A byte budget shared by the work a stage does at once (the seed's
``MaxConcurrentInputSize``): many large bodies queue for it instead of exhausting memory
or scratch disk. A body larger than the whole budget takes all of it and runs alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class ByteBudget:
    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError("a byte budget must be positive")
        self._limit = limit
        self._used = 0
        self._changed = asyncio.Condition()

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def used(self) -> int:
        return self._used

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        want = min(max(size, 1), self._limit)
        async with self._changed:
            await self._changed.wait_for(lambda: self._used + want <= self._limit)
            self._used += want
        try:
            yield
        finally:
            async with self._changed:
                self._used -= want
                self._changed.notify_all()
