"""Sender threads: one per association, fed prepared instances through a queue.

pynetdicom is blocking, so C-STOREs run in threads. Each of a destination's
``max_associations`` sender threads loops on one queue of prepared instances: as soon as
the peer answered one C-STORE, the thread takes the next instance and sends it, without
a round trip through the event loop (which is busy fetching, decrypting and acking the
others). The event loop only learns the outcome: each instance's status, or the typed
error, resolves the future its handler awaits.

An outcome is told once the thread has written its next queued request, if one is
waiting (at once otherwise): telling wakes the event loop, whose acking and fetching
would then compete for the GIL with the thread's next request, on the path from one
response to the next request, the one stretch of a C-STORE the peer does not spend.

A queued instance's plaintext file belongs to the senders from then on: the thread that
takes it removes it once the C-STORE ended (when it tells the outcome), whatever the
outcome, and ``close`` removes those never taken. A handler cancelled while its
instance waits in the queue marks it skipped; one cancelled while its instance is on the
wire cannot stop that C-STORE (the message is not acked, so it comes back and is sent
again).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from dicomflow.scu_gateway.association import AssociationPool, Pair

log = logging.getLogger(__name__)

JOIN_TIMEOUT = 5.0


@dataclass(eq=False)
class Sending:
    """One queued C-STORE."""

    path: Path
    pair: Pair
    loop: asyncio.AbstractEventLoop
    result: asyncio.Future[int]
    skipped: bool = False  # set by a cancelled handler; checked before sending

    async def status(self) -> int:
        """The peer's status; raises what ``AssociationPool.store`` raises
        (DeliveryDeferred, DeliveryRefused)."""
        try:
            return await self.result
        except asyncio.CancelledError:
            self.skipped = True
            raise


class Senders:
    """``count`` threads sending one destination's instances through ``pool``."""

    def __init__(self, pool: AssociationPool, count: int) -> None:
        self._pool = pool
        self._jobs: queue.SimpleQueue[Sending | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._run, name=f"scu-{pool.name}-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, path: Path, pair: Pair) -> Sending:
        """Queue the Part-10 file at ``path`` for a C-STORE; from here on the senders own
        the file and remove it. Must be called on the event loop."""
        if self._closed:
            raise RuntimeError("the senders are closed")
        loop = asyncio.get_running_loop()
        job = Sending(path, pair, loop, loop.create_future())
        self._jobs.put(job)
        return job

    def close(self) -> None:
        """Stop the threads once their current C-STORE ended; drop what is still queued."""
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=JOIN_TIMEOUT)
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.path.unlink(missing_ok=True)

    def _run(self) -> None:
        ended: _Ended | None = None  # the last C-STORE, told once the next request is out
        while True:
            job = self._next(ended)
            prior, ended = ended, None
            if job is None:
                if prior is not None:
                    prior.tell()
                return
            try:
                if job.skipped:
                    job.path.unlink(missing_ok=True)
                    continue
                outcome: int | Exception
                try:
                    written = prior.tell if prior is not None else None
                    outcome = self._pool.store(job.path, job.pair, written)
                except Exception as exc:  # noqa: BLE001 (handed to the awaiting handler)
                    outcome = exc
                ended = _Ended(job, outcome)
            finally:
                if prior is not None:
                    prior.tell()  # the request never got written: tell it now

    def _next(self, ended: _Ended | None) -> Sending | None:
        """The next job; an ended C-STORE is told first if none is waiting."""
        if ended is not None:
            try:
                return self._jobs.get_nowait()
            except queue.Empty:
                ended.tell()
        return self._jobs.get()


@dataclass(eq=False)
class _Ended:
    """A C-STORE that ended, its file not yet removed nor its outcome told."""

    job: Sending
    outcome: int | Exception
    told: bool = False

    def tell(self) -> None:
        """Remove the file and hand the outcome to the handler (once)."""
        if self.told:
            return
        self.told = True
        try:
            self.job.path.unlink(missing_ok=True)
        except OSError as exc:  # called on the wire path: never fails a C-STORE
            log.warning("cannot remove a sent instance's spool file: %s", exc.strerror)
        _resolve(self.job, self.outcome)


def _resolve(job: Sending, outcome: int | Exception) -> None:
    def settle() -> None:
        if job.result.done():  # the handler was cancelled
            return
        if isinstance(outcome, Exception):
            job.result.set_exception(outcome)
        else:
            job.result.set_result(outcome)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed: nobody waits any more
        log.debug("sender finished after the event loop closed")
