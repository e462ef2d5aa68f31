"""Whether a destination can be reached, and holding its deliveries while it cannot.

Without this, a PACS that is down for longer than the retry budget (``max_deliver``
attempts with backoff: minutes) would send its whole queue to the dead-letter stream,
where only a person running ``dlq replay`` brings it back. A maintenance window must
not need that. So the first delivery that cannot reach the peer (connection refused or
timed out, association aborted or rejected as transient, no response) marks the
destination *down*: its delivery consumer stops fetching, and queued requests wait on
DELIVERY without spending attempts. A C-ECHO every ``echo_interval`` seconds probes the
peer; when it answers at the DICOM level, the destination is *up* again and delivery
resumes where it stopped. Only the requests in flight at that moment spend an attempt.

"Answers at the DICOM level" includes refusals: a peer that rejects the association
permanently (an AE title it does not know) or accepts no Verification context is
reachable; its C-STOREs are then refused and dead-lettered as before, never held forever.

The state is exported as ``dicomflow_scu_destination_up{destination}`` (1 or 0) and each
transition is logged once, with how long the destination was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from dicomflow.scu_gateway.status import DeliveryRefused
from dicomflow.shared.errors import TransientError

log = logging.getLogger(__name__)

Echo = Callable[[], int]  # blocking: the C-ECHO status, or a typed error


class DestinationHealth:
    """Up/down state of one destination, probed with C-ECHO while it is down.

    Every method runs on the event loop; ``echo`` runs in a worker thread.
    """

    def __init__(
        self,
        where: str,
        echo: Echo,
        interval: float,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._where = where
        self._echo = echo
        self._interval = interval
        self._on_change = on_change
        self._up = asyncio.Event()
        self._up.set()
        self._down_since = 0.0
        self._probe: asyncio.Task[None] | None = None
        if on_change is not None:
            on_change(True)

    @property
    def is_up(self) -> bool:
        return self._up.is_set()

    async def check(self) -> None:
        """One C-ECHO now (at start-up), logged; a peer that cannot be reached is down."""
        failure = await self._echo_failure()
        if failure is not None:
            log.warning("C-ECHO to %s failed: %s", self._where, failure)
            self.down(failure)

    def down(self, reason: str) -> None:
        """The peer could not be reached: hold deliveries and start probing it."""
        if not self._up.is_set():
            return
        self._up.clear()
        self._down_since = time.monotonic()
        if self._on_change is not None:
            self._on_change(False)
        log.warning(
            "%s unreachable (%s): deliveries held, C-ECHO every %.0f s until it answers",
            self._where,
            reason,
            self._interval,
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._probe_until_up(), name="destination-probe")

    async def wait_up(self, stop: asyncio.Event) -> None:
        """Return once the destination is up, or ``stop`` is set."""
        if self._up.is_set() or stop.is_set():
            return
        up = asyncio.create_task(self._up.wait())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({up, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            stopping.cancel()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe

    async def _echo_failure(self) -> str | None:
        """None when the peer answered a C-ECHO at the DICOM level, refusals included
        (reachable: its C-STOREs will say why); otherwise why it could not be reached.
        Never raises: the probe must outlive any failure."""
        try:
            status = await asyncio.to_thread(self._echo)
        except DeliveryRefused as exc:
            log.warning("C-ECHO to %s refused (the peer is reachable): %s", self._where, exc)
        except TransientError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 (unforeseen: treated as unreachable)
            log.warning("C-ECHO to %s failed unexpectedly: %r", self._where, exc)
            return type(exc).__name__
        else:
            log.info("C-ECHO to %s: status 0x%04X", self._where, status)
        return None

    async def _probe_until_up(self) -> None:
        attempts = 0
        while not self._up.is_set():
            await asyncio.sleep(self._interval)
            attempts += 1
            failure = await self._echo_failure()
            if failure is not None:
                log.debug("C-ECHO %d to %s failed: %s", attempts, self._where, failure)
                continue
            self._up.set()
            if self._on_change is not None:
                self._on_change(True)
            log.warning(
                "%s reachable again after %.0f s (%d C-ECHO probe(s)): deliveries resume",
                self._where,
                time.monotonic() - self._down_since,
                attempts,
            )
