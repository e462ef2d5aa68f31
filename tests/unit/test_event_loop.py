"""The service runner's event loop: uvloop by default, asyncio's on request, and a
value that is neither refused with the field named."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from dicomflow.shared.settings import ServiceSettings, TelemetrySettings
from dicomflow.shared.stage import runner
from dicomflow.shared.telemetry.bundle import Telemetry
from pydantic import ValidationError


def _loop_of_a_run(settings: ServiceSettings) -> type[asyncio.AbstractEventLoop]:
    seen: list[type[asyncio.AbstractEventLoop]] = []

    async def service(stop: asyncio.Event, telemetry: Telemetry) -> None:
        seen.append(type(asyncio.get_running_loop()))

    assert runner.run("test", service, settings) == runner.EXIT_OK
    return seen[0]


def _settings(**fields: object) -> ServiceSettings:
    return ServiceSettings(
        telemetry=TelemetrySettings(metrics_host="127.0.0.1", metrics_port=0),
        **fields,  # type: ignore[arg-type]
    )


def test_a_service_runs_on_uvloop_by_default() -> None:
    assert _loop_of_a_run(_settings()) is uvloop.Loop


def test_event_loop_asyncio_runs_the_standard_library_loop() -> None:
    loop = _loop_of_a_run(_settings(event_loop="asyncio"))
    assert loop is not uvloop.Loop
    assert issubclass(loop, asyncio.BaseEventLoop)


def test_the_environment_selects_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMFLOW_EVENT_LOOP", "asyncio")
    assert ServiceSettings().event_loop == "asyncio"


def test_an_unknown_event_loop_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="event_loop"):
        _settings(event_loop="trio")
