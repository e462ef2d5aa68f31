"""Metrics registry, readiness and the probe server, and trace propagation, without servers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import obstore.store
import pytest
from dicomflow.scp_gateway import metrics as scp_metrics
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.settings import TelemetrySettings
from dicomflow.shared.telemetry.bundle import Telemetry
from dicomflow.shared.telemetry.health import HealthServer, Readiness
from dicomflow.shared.telemetry.metrics import CONSUMER_OUTCOMES, Metrics
from dicomflow.shared.telemetry.tracing import Tracing
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_each_service_has_a_registry_of_its_own() -> None:
    a, b = Metrics("encryptor"), Metrics("store-writer")  # no duplicate-registration error
    a.instances.labels("encryptor", "ack").inc()
    assert samples(a)[("dicomflow_instances_total", (("outcome", "ack"), ("stage", "encryptor")))]
    assert not any(name.startswith("dicomflow_instances") for name, _ in samples(b))
    assert REGISTRY.get_sample_value("dicomflow_instances_total") is None


def test_known_label_sets_start_at_zero() -> None:
    m = Metrics("encryptor")
    m.consumer_stage("encryptor")
    values = samples(m)
    for outcome in CONSUMER_OUTCOMES:
        key = ("dicomflow_instances_total", (("outcome", outcome), ("stage", "encryptor")))
        assert values[key] == 0.0
    scp_metrics.of(m).at_zero(accept_any=False)
    assert values != samples(m)
    calling = {dict(labels).get("calling_ae") for _, labels in samples(m)} - {None}
    assert calling == {"allowed", "not_allowed"}  # classes, never AE titles


async def _get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split(" ")[1]), body


async def test_probe_server_follows_the_readiness_checks() -> None:
    metrics = Metrics("store-writer")
    readiness = Readiness(metrics, interval=0.05)
    nats_up = [True]

    async def nats() -> bool:
        return nats_up[0]

    readiness.add("nats", nats)
    readiness.add_storage(obstore.store.MemoryStore(), "")
    server = await HealthServer(metrics, readiness).start("127.0.0.1", 0)
    try:
        assert await _get(server.port, "/livez") == (200, "ok\n")
        await readiness.refresh()
        assert await _get(server.port, "/readyz") == (503, "not ready: started\n")
        readiness.started()
        await readiness.refresh()
        assert (await _get(server.port, "/readyz"))[0] == 200
        nats_up[0] = False
        await readiness.refresh()
        assert await _get(server.port, "/readyz") == (503, "not ready: nats\n")
        status, body = await _get(server.port, "/metrics")
        assert status == 200
        assert 'dicomflow_check_ok{check="nats",service="store-writer"} 0.0' in body
        assert 'dicomflow_check_ok{check="storage",service="store-writer"} 1.0' in body
        assert 'dicomflow_ready{service="store-writer"} 0.0' in body
        assert (await _get(server.port, "/other"))[0] == 404
        nats_up[0] = True
        await readiness.refresh()
        readiness.draining()
        assert (await _get(server.port, "/readyz"))[0] == 503
    finally:
        await server.close()


def _instance(traceparent: str = "") -> Instance:
    return Instance(
        sop_class_uid="1.2",
        sop_instance_uid="1.2.3",
        study_uid="1.2.4",
        series_uid="1.2.5",
        calling_ae="CT01",
        called_ae="DICOMFLOW",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=10,
        sha256="0" * 64,
        traceparent=traceparent,
    )


def test_trace_context_continues_across_services(tmp_path: Path) -> None:
    settings = TelemetrySettings(traces="jsonl", traces_path=tmp_path)
    gateway = Tracing.from_settings("scp-gateway", settings)
    encryptor = Tracing.from_settings("encryptor", settings)
    with gateway.span("C-STORE"):
        sent = gateway.propagate(_instance())
    assert sent.traceparent.startswith("00-")
    with encryptor.span("encryptor", parent=sent.traceparent):
        onward = encryptor.propagate(sent)
    assert onward.traceparent != sent.traceparent
    gateway.shutdown()
    encryptor.shutdown()
    spans = [
        json.loads(line)
        for name in ("scp-gateway", "encryptor")
        for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()
    ]
    assert len({s["trace_id"] for s in spans}) == 1
    root, child = spans
    assert child["parent_id"] == root["span_id"]
    assert sent.traceparent.split("-")[1] == root["trace_id"]


def test_tracing_off_passes_an_incoming_context_through() -> None:
    telemetry = Telemetry.create("encryptor")
    incoming = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    with telemetry.tracing.span("encryptor", parent=incoming):
        assert telemetry.tracing.propagate(_instance(incoming)).traceparent == incoming
    assert telemetry.tracing.propagate(_instance()).traceparent == ""


def test_jsonl_traces_need_a_folder() -> None:
    from dicomflow.shared.errors import ConfigError

    with pytest.raises(ConfigError, match="traces_path"):
        Tracing.from_settings("encryptor", TelemetrySettings(traces="jsonl"))
