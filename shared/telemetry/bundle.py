"""What the runner hands every service: its metrics, its readiness checks, its tracer."""

from __future__ import annotations

from dataclasses import dataclass

from dicomflow.shared.settings import TelemetrySettings
from dicomflow.shared.telemetry.health import Readiness
from dicomflow.shared.telemetry.metrics import Metrics
from dicomflow.shared.telemetry.tracing import Tracing


@dataclass(frozen=True, slots=True)
class Telemetry:
    metrics: Metrics
    readiness: Readiness
    tracing: Tracing

    @classmethod
    def create(cls, service: str, settings: TelemetrySettings | None = None) -> Telemetry:
        """Fresh, unshared instances (a registry of its own); tracing as configured."""
        settings = settings or TelemetrySettings()
        metrics = Metrics(service)
        return cls(
            metrics=metrics,
            readiness=Readiness(metrics, settings.readiness_interval),
            tracing=Tracing.from_settings(service, settings),
        )
