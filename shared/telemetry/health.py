"""Liveness, readiness and metrics over HTTP: one small server per service.

- ``GET /livez``: 200 while the event loop answers (a blocked loop fails the probe).
- ``GET /readyz``: 200 while every readiness check passed on its last run, 503 with the
  failing checks otherwise. Checks run in the background every ``readiness_interval``
  seconds (NATS connected; object storage reachable, for the stages that use it), so
  a probe never waits on a slow dependency, and at once when the service says it has
  started (topology set up), so it is ready as soon as it works, not one interval
  later. A service is not ready before it started nor once it is draining.
- ``GET /metrics``: the service's registry in the Prometheus text format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from dicomflow.shared.storage import objectstore
from dicomflow.shared.storage.objectstore import ObjectStore
from dicomflow.shared.telemetry.metrics import Metrics
from nats.aio.client import Client
from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]

CHECK_TIMEOUT = 5.0
PROBE_KEY = ".dicomflow-readiness-probe"  # never written: a HEAD that finds nothing is fine


class Readiness:
    def __init__(self, metrics: Metrics, interval: float) -> None:
        self._metrics = metrics
        self._interval = interval
        self._checks: dict[str, Check] = {}
        self._results: dict[str, bool] = {"started": False}
        self._draining = False
        self._wake = asyncio.Event()  # set by ``started``: run the checks now
        metrics.check_ok.labels(metrics.service, "started").set(0)

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check
        self._results[name] = False
        self._metrics.check_ok.labels(self._metrics.service, name).set(0)

    def add_nats(self, nc: Client) -> None:
        async def connected() -> bool:
            return nc.is_connected

        self.add("nats", connected)

    def add_storage(self, store: ObjectStore, root_path: str) -> None:
        key = f"{root_path}{PROBE_KEY}"
        seconds = self._metrics.storage_seconds

        async def reachable() -> bool:
            start = time.perf_counter()
            try:
                await objectstore.exists(store, key)
            except Exception:
                seconds.labels("probe", "error").observe(time.perf_counter() - start)
                raise
            seconds.labels("probe", "ok").observe(time.perf_counter() - start)
            return True

        self.add("storage", reachable)

    def started(self) -> None:
        self._set("started", ok=True)
        self._wake.set()  # the checks it added (NATS, storage) run now, not an interval later

    def draining(self) -> None:
        self._draining = True
        self._metrics.ready.labels(self._metrics.service).set(0)

    @property
    def ready(self) -> bool:
        return not self._draining and all(self._results.values())

    @property
    def failing(self) -> list[str]:
        return sorted(name for name, ok in self._results.items() if not ok)

    async def refresh(self) -> None:
        for name, check in list(self._checks.items()):
            try:
                ok = await asyncio.wait_for(check(), timeout=CHECK_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 (any failure of a check means not ready)
                log.debug("readiness check %s failed: %s", name, type(exc).__name__)
                ok = False
            if ok != self._results.get(name):
                log.info("readiness check %s: %s", name, "ok" if ok else "failing")
            self._set(name, ok=ok)
        self._metrics.ready.labels(self._metrics.service).set(1 if self.ready else 0)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            await self.refresh()
            await self._pause(stop)
        self.draining()

    async def _pause(self, stop: asyncio.Event) -> None:
        """Until the interval passed, ``stop`` is set or ``started`` wakes the checks."""
        waits = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())}
        try:
            await asyncio.wait(waits, timeout=self._interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def _set(self, name: str, *, ok: bool) -> None:
        self._results[name] = ok
        self._metrics.check_ok.labels(self._metrics.service, name).set(1 if ok else 0)


class HealthServer:
    """A minimal HTTP/1.1 server on the service's event loop (one request per connection)."""

    def __init__(self, metrics: Metrics, readiness: Readiness) -> None:
        self._metrics = metrics
        self._readiness = readiness
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> HealthServer:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5.0)
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            status, ctype, body = self._answer(method, path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a probe that went away or sent garbage: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _answer(self, method: str, path: str) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, self._metrics.exposition()
        if path == "/livez":
            return "200 OK", text, b"ok\n"
        if path == "/readyz":
            if self._readiness.ready:
                return "200 OK", text, b"ready\n"
            failing = ", ".join(self._readiness.failing) or "draining"
            return "503 Service Unavailable", text, f"not ready: {failing}\n".encode()
        return "404 Not Found", text, b"/metrics, /livez, /readyz\n"
