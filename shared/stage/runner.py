"""One service runner: logging, telemetry, signals, graceful drain, exit codes.

A service is an ``async`` function that runs until the ``stop`` event is set and then
returns after finishing its in-flight work. SIGTERM and SIGINT set the event; a second
signal exits at once. Exit codes: 0 clean stop, 2 configuration error, 1 anything else.
The codes are a contract: `dicomflow up` restarts a stage that exited 1 (or on a signal)
and stops, naming the stage and its error, when one exits 2 (retrying cannot help).

The event loop is uvloop's (``event_loop``, default): on the stages' per-message work
(socket reads and writes, futures, hand-offs from threads) it spends less CPU than
asyncio's own loop, which ``event_loop = "asyncio"`` selects.

The runner creates the service's ``Telemetry`` (a metrics registry of its own,
readiness checks, a tracer) and serves /metrics, /livez and /readyz on
``telemetry.metrics_host:metrics_port`` for as long as the service runs; readiness
turns false as soon as the service starts draining.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

import uvloop
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import ServiceSettings
from dicomflow.shared.telemetry import logs
from dicomflow.shared.telemetry.bundle import Telemetry
from dicomflow.shared.telemetry.health import HealthServer

log = logging.getLogger(__name__)

Service = Callable[[asyncio.Event, Telemetry], Awaitable[None]]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def run(name: str, service: Service, settings: ServiceSettings) -> int:
    logs.setup(name, settings.log_level)
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(_main(name, service, settings))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        print(f"dicomflow {name}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:
        log.exception("%s stopped on an unexpected error", name)
        return EXIT_FAILURE
    log.info("%s stopped", name)
    return EXIT_OK


def loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes the loop ``event_loop`` names; None for asyncio's default."""
    if event_loop == "uvloop":
        return uvloop.new_event_loop
    return None


async def _main(name: str, service: Service, settings: ServiceSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(EXIT_FAILURE)
        log.info("signal %s: draining", signal.Signals(signum).name)
        telemetry.readiness.draining()
        stop.set()

    telemetry = Telemetry.create(name, settings.telemetry)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    server = HealthServer(telemetry.metrics, telemetry.readiness)
    try:
        await server.start(settings.telemetry.metrics_host, settings.telemetry.metrics_port)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {settings.telemetry.metrics_host}:"
            f"{settings.telemetry.metrics_port} ({exc.strerror}); set telemetry.metrics_port "
            "(dicomflow up: --metrics-port; 0 picks a free port)"
        ) from exc
    log.info(
        "%s starting on the %s event loop; metrics and probes on http://%s:%d "
        "(/metrics, /livez, /readyz)",
        name,
        settings.event_loop,
        settings.telemetry.metrics_host,
        server.port,
    )
    readiness = asyncio.create_task(telemetry.readiness.run(stop), name="readiness")
    try:
        await service(stop, telemetry)
    finally:
        readiness.cancel()
        await server.close()
        telemetry.tracing.shutdown()
