"""OpenTelemetry traces: one trace per instance, its context in the ``traceparent`` header.

The gateway starts a trace for each C-STORE and sends its context with the instance;
every consumer stage continues it (``span(..., parent=traceparent)``) and publishes the
context of its own span onward (``propagate``), so one C-STORE is one trace across
processes. A ``TracerProvider`` is built per service from its settings and passed
down; none is installed globally. Exporters:

- ``off`` (default): nothing is recorded; an incoming ``traceparent`` passes through.
- ``otlp``: OTLP over HTTP to ``telemetry.otlp_endpoint``, batched. Needs the optional
  package ``opentelemetry-exporter-otlp-proto-http`` (``pip install 'dicomflow[otlp]'``).
- ``jsonl``: each finished span as one JSON line in ``<traces_path>/<service>.jsonl``
  (for tests and debugging).

Span attributes are stage, outcome, delivery count, size and DIMSE status: never UIDs
or patient data.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from dicomflow.shared.contracts.messages import H_TRACEPARENT, Instance
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import TelemetrySettings
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    def __init__(self, service: str, provider: TracerProvider | None = None) -> None:
        self.service = service
        self._provider = provider
        self._tracer: trace.Tracer = (
            provider.get_tracer("dicomflow") if provider is not None else trace.NoOpTracer()
        )

    @classmethod
    def from_settings(cls, service: str, settings: TelemetrySettings) -> Tracing:
        if settings.traces == "off":
            return cls(service)
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if settings.traces == "jsonl":
            if settings.traces_path is None:
                raise ConfigError("telemetry.traces = jsonl needs telemetry.traces_path (a folder)")
            exporter = JsonLinesExporter(settings.traces_path / f"{service}.jsonl")
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings.otlp_endpoint)))
        return cls(service, provider)

    @contextmanager
    def span(
        self,
        name: str,
        *,
        parent: str = "",
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
        root: bool = False,
    ) -> Iterator[Span]:
        """A span, current inside the block; a child of ``parent`` (a traceparent) if
        given, else of the current span, or (``root``) the first span of a new trace."""
        with self._tracer.start_as_current_span(
            name, context=_context(parent, root), kind=kind, attributes=attributes
        ) as span:
            yield span

    def start(
        self,
        name: str,
        *,
        parent: str = "",
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Span:
        """A span that is not made current (the caller ends it): a child of ``parent``
        (a traceparent) if given, else the first span of a new trace, never a child of
        whatever span is current. The consumer opens one per delivery of a batch, side
        by side: a delivery without a ``traceparent`` must not nest under another's."""
        return self._tracer.start_span(
            name, context=_context(parent, root=True), kind=kind, attributes=attributes
        )

    @staticmethod
    def traceparent() -> str:
        """The W3C traceparent of the current span, or "" when nothing is recorded."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        return carrier.get(H_TRACEPARENT, "")

    def propagate(self, instance: Instance) -> Instance:
        """``instance`` carrying the current span's context (unchanged if there is none)."""
        current = self.traceparent()
        return replace(instance, traceparent=current) if current else instance

    def shutdown(self) -> None:
        """Flush and stop the exporters (at the end of the service)."""
        if self._provider is not None:
            self._provider.shutdown()


def _context(parent: str, root: bool) -> Context | None:
    """The context a span starts in: ``parent``'s (a traceparent), an empty one (a new
    trace) for ``root``, else None (the current one)."""
    if parent:
        return _PROPAGATOR.extract({H_TRACEPARENT: parent})
    return Context() if root else None


class JsonLinesExporter(SpanExporter):
    """Each span as one JSON object per line: ids, parent, name, times, attributes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(_as_dict(span)) + "\n" for span in spans]
        with self._lock, self._path.open("a", encoding="utf-8") as f:
            f.writelines(lines)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _as_dict(span: ReadableSpan) -> dict[str, object]:
    ctx = span.get_span_context()
    return {
        "service": span.resource.attributes.get("service.name", ""),
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}" if ctx is not None else "",
        "span_id": f"{ctx.span_id:016x}" if ctx is not None else "",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent is not None else "",
        "start_ns": span.start_time,
        "end_ns": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
    }


def _otlp_exporter(endpoint: str) -> SpanExporter:
    name = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(
            "telemetry.traces = otlp needs the package opentelemetry-exporter-otlp-proto-http "
            "(pip install 'dicomflow[otlp]'); or set telemetry.traces = off"
        ) from exc
    exporter: SpanExporter = module.OTLPSpanExporter(endpoint=endpoint)
    return exporter
