"""One service runner: logging, signals, graceful drain, exit codes.

A service is an ``async`` function that runs until the ``stop`` event is set and then
returns after finishing its in-flight work. SIGTERM and SIGINT set the event; a second
signal exits at once. Exit codes: 0 clean stop, 2 configuration error, 1 anything else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from dicomflow.shared import logs
from dicomflow.shared.errors import ConfigError

log = logging.getLogger(__name__)

Service = Callable[[asyncio.Event], Awaitable[None]]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def run(name: str, service: Service, log_level: str = "INFO") -> int:
    logs.setup(name, log_level)
    try:
        asyncio.run(_main(name, service))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        print(f"dicomflow {name}: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:
        log.exception("%s stopped on an unexpected error", name)
        return EXIT_FAILURE
    log.info("%s stopped", name)
    return EXIT_OK


async def _main(name: str, service: Service) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(EXIT_FAILURE)
        log.info("signal %s: draining", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    log.info("%s starting", name)
    await service(stop)
