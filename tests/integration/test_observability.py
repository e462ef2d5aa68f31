"""Operating dicomflow: the dashboard, traces and probes, on a real run.

One ingest-and-delivery run (storescu -> every stage -> Orthanc) is scraped by a real
Prometheus; every PromQL expression of the Grafana dashboard must return data from it,
and every instance must be one trace from the C-STORE to its delivery. Readiness is
checked against a real nats-server going away and coming back.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, ct_series
from support.orthanc import Orthanc
from support.pipeline import Pipeline
from support.prometheus import Prometheus
from support.servers import wait_for

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "dicomflow.json"
DESTINATION = "PACS"
CONSUMER_STAGES = ("encryptor", "store-writer", "scu-router", f"deliver-{DESTINATION}")


@dataclass
class Run:
    pipeline: Pipeline
    prometheus: Prometheus
    files: list[Made]
    traces: Path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("observability")
    traces = root / "traces"
    with (
        NatsServer(root / "jetstream") as nats,
        Orthanc(root / "orthanc", ae_title="ORTHANC_A") as orthanc,
    ):
        scu = {
            "destinations": {
                DESTINATION: {
                    "ae_title": orthanc.ae_title,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                }
            },
            "rules": [{"destinations": [DESTINATION]}],
        }
        pipeline = Pipeline(
            root / "p",
            nats,
            {"backend": "local", "local_path": root / "objects"},
            scu=scu,
            extra={"telemetry": {"traces": "jsonl", "traces_path": traces}},
        ).start()
        try:
            targets = {name: pipeline.metrics_port(name) for name in pipeline.names}
            with Prometheus(root / "prometheus", targets) as prometheus:
                prometheus.wait_scraped()
                files = ct_series(root / "ct", 5)
                sent = pipeline.send(files)
                assert sent.statuses() == ["Success"] * len(files), sent.output
                # A calling AE off the allow-list: its association is rejected and counted.
                assert pipeline.storescu([files[0].path], calling="INTRUDER").returncode != 0
                wait_for("every instance in Orthanc", lambda: len(orthanc.instances()) == 5)
                wait_for("an empty DELIVERY queue", lambda: pipeline.pending_deliveries() == 0)
                yield Run(pipeline, prometheus, files, traces)
        finally:
            pipeline.stop()


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    assert len(queries) >= 15
    return queries


def has_data(expr: str, result: list[dict[str, Any]]) -> bool:
    if not result:
        return False
    if "histogram_quantile" in expr:  # NaN until the window holds an observation
        return any(math.isfinite(float(sample["value"][1])) for sample in result)
    return True


def test_every_dashboard_query_returns_data_from_a_real_run(run: Run) -> None:
    queries = [
        (title, expr.replace("$__rate_interval", "1m")) for title, expr in dashboard_queries()
    ]
    missing: list[str] = []

    def all_answered() -> bool:
        missing[:] = [
            f"{title}: {expr}"
            for title, expr in queries
            if not has_data(expr, run.prometheus.query(expr))
        ]
        return not missing

    deadline = time.monotonic() + 30
    while not all_answered() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)

    # The counters, not their rate (a stage that finished before its first scrape has a
    # flat series), polled: a stage's last ack may not have been scraped yet (1 s interval).
    def busy() -> set[str]:
        acked = run.prometheus.query('sum by (stage) (dicomflow_instances_total{outcome="ack"})')
        return {s["metric"]["stage"] for s in acked if float(s["value"][1]) > 0}

    wait_for("every consumer stage's acks scraped", lambda: busy() == set(CONSUMER_STAGES), 15)
    assert busy() == set(CONSUMER_STAGES)

    # Counters pre-created at 0: poll until the last increment is scraped (1 s interval),
    # then compare, so a count that is wrong (not just late) still fails.
    def values(expr: str) -> list[float]:
        return [float(s["value"][1]) for s in run.prometheus.query(expr)]

    def settled(expr: str, expected: list[float]) -> list[float]:
        deadline = time.monotonic() + 15
        while (got := values(expr)) != expected and time.monotonic() < deadline:
            time.sleep(0.5)
        return got

    cstores = 'dicomflow_cstore_responses_total{status="success"}'
    assert settled(cstores, [5.0]) == [5.0]
    rejected = 'dicomflow_scp_associations_total{result="rejected",calling_ae="not_allowed"}'
    assert settled(rejected, [1.0]) == [1.0]
    delivered = f'dicomflow_deliveries_total{{destination="{DESTINATION}",outcome="delivered"}}'
    assert settled(delivered, [5.0]) == [5.0]


def _spans(folder: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(folder.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


def test_each_instance_is_one_trace_from_cstore_to_delivery(run: Run) -> None:
    chain = ("C-STORE", *CONSUMER_STAGES)

    def complete() -> dict[str, dict[str, dict[str, Any]]]:
        traces: dict[str, dict[str, dict[str, Any]]] = {}
        for span in _spans(run.traces):
            traces.setdefault(span["trace_id"], {})[span["name"]] = span
        done = {t: s for t, s in traces.items() if set(chain) <= set(s)}
        return done if len(done) == len(run.files) else {}

    traces = wait_for("a complete trace per instance", complete, timeout=20)
    for spans in traces.values():
        assert spans["C-STORE"]["service"] == "scp-gateway"
        assert spans["C-STORE"]["parent_id"] == ""
        for parent, child in itertools.pairwise(chain):
            assert spans[child]["parent_id"] == spans[parent]["span_id"], (parent, child)
        assert spans["encryptor"]["service"] == "encryptor"
        assert spans["store-writer"]["service"] == "store-writer"
        assert spans[f"deliver-{DESTINATION}"]["service"] == "scu-gateway"
    text = "".join(p.read_text() for p in run.traces.glob("*.jsonl"))
    for f in run.files:  # no UID in any span
        assert f.sop_instance_uid not in text


def _probe(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as rsp:
            return int(rsp.status), rsp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:  # a 503's response holds the connection until closed
            return exc.code, exc.read().decode()


def test_readiness_follows_nats(tmp_path: Path, nats_server: NatsServer) -> None:
    pipeline = Pipeline(
        tmp_path / "p",
        nats_server,
        {"backend": "local", "local_path": tmp_path / "objects"},
        extra={"telemetry": {"readiness_interval": 0.2}},
    )
    pipeline.start("encryptor", "store-writer")
    try:
        ports = {name: pipeline.metrics_port(name) for name in ("encryptor", "store-writer")}
        for port in ports.values():
            wait_for("ready", lambda port=port: _probe(port, "/readyz")[0] == 200, 20)

        nats_server.stop()
        for port in ports.values():
            wait_for("not ready", lambda port=port: _probe(port, "/readyz")[0] == 503, 20)
            body = _probe(port, "/readyz")[1]
            assert "nats" in body, body
            assert _probe(port, "/livez")[0] == 200  # alive: no restart wanted

        nats_server.start()  # same port and folder; the stages reconnect by themselves
        for port in ports.values():
            wait_for("ready again", lambda port=port: _probe(port, "/readyz")[0] == 200, 30)
        assert all(stage.restarts == 0 for stage in pipeline.stages.values())
        assert pipeline.stages["encryptor"].exit_code() is None
    finally:
        pipeline.stop()
