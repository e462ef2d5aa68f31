"""storescu -> pipeline -> routing rules -> scu-gateway -> Orthanc, on real servers.

Orthanc is the remote PACS; what arrived is read back through its REST API and compared
byte for byte with what was sent.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import CTImageStorage, generate_uid

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, ct_series, dataset, dataset_bytes, made, transfer_syntax_set
from support.dicomfiles import write as write_dicom
from support.orthanc import Orthanc
from support.pipeline import Pipeline, StoreResult
from support.servers import wait_for

pytestmark = pytest.mark.integration


def destination(orthanc: Orthanc, **overrides: Any) -> dict[str, Any]:
    return {
        "ae_title": orthanc.ae_title,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
        "idle_timeout": 5.0,
        **overrides,
    }


@pytest.fixture
def orthanc_a(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc-a", ae_title="ORTHANC_A") as server:
        yield server


@pytest.fixture
def orthanc_b(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path / "orthanc-b", ae_title="ORTHANC_B") as server:
        yield server


def local_storage(tmp_path: Path) -> dict[str, Any]:
    return {"backend": "local", "local_path": tmp_path / "objects"}


def assert_identical(orthanc: Orthanc, files: list[Made]) -> None:
    arrived = orthanc.instances()
    assert set(arrived) == {f.sop_instance_uid for f in files}
    for f in files:
        assert orthanc.dataset_bytes(arrived[f.sop_instance_uid]) == dataset_bytes(f.path), f.path


def delivered_lines(pipeline: Pipeline, destination: str) -> int:
    return pipeline.logs("scu-gateway").count(f"delivered to {destination}:")


def test_routed_by_modality_byte_identical(
    tmp_path: Path, nats_server: NatsServer, orthanc_a: Orthanc, orthanc_b: Orthanc
) -> None:
    files = transfer_syntax_set(tmp_path / "ts") + ct_series(tmp_path / "ct", 5)
    scu = {
        "destinations": {"A": destination(orthanc_a), "B": destination(orthanc_b)},
        "rules": [
            {"modality": "CT", "destinations": ["A"]},
            {"modality": "MR", "destinations": ["B"]},
            {"modality": "[OU][ST]", "destinations": ["B"]},  # OT, US
            {"modality": "dx", "destinations": ["A", "B"]},  # fan-out, case-insensitive
        ],
    }
    modality = {f.sop_instance_uid: str(_modality(f)) for f in files}
    to_a = [f for f in files if modality[f.sop_instance_uid] in ("CT", "DX")]
    to_b = [f for f in files if modality[f.sop_instance_uid] in ("MR", "OT", "US", "DX")]
    pipeline = Pipeline(tmp_path / "p", nats_server, local_storage(tmp_path), scu=scu).start()
    try:
        sent = pipeline.send(files)
        assert sent.statuses() == ["Success"] * len(files), sent.output
        wait_for("A's share", lambda: len(orthanc_a.instances()) >= len(to_a))
        wait_for("B's share", lambda: len(orthanc_b.instances()) >= len(to_b))
        wait_for("an empty DELIVERY queue", lambda: pipeline.pending_deliveries() == 0)
        assert_identical(orthanc_a, to_a)
        assert_identical(orthanc_b, to_b)
        assert delivered_lines(pipeline, "A") == len(to_a)
        assert delivered_lines(pipeline, "B") == len(to_b)
        assert pipeline.dead_letters() == []
    finally:
        pipeline.stop()


def _modality(f: Made) -> str:
    from pydicom import dcmread

    return str(dcmread(f.path, stop_before_pixels=True).Modality)


def destination_up(pipeline: Pipeline, name: str) -> float:
    """``dicomflow_scu_destination_up`` as the scu-gateway serves it now."""
    port = pipeline.metrics_port("scu-gateway")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(rf'^dicomflow_scu_destination_up{{destination="{name}"}} (\S+)$', text, re.M)
    assert match, text
    return float(match.group(1))


OUTAGE_SECONDS = 8.0


def test_destination_outage_longer_than_the_retry_budget_then_everything_arrives_once(
    tmp_path: Path, nats_server: NatsServer, orthanc_a: Orthanc
) -> None:
    """Three attempts with backoff of at most 0.5 s are spent in about a second; the
    PACS stays away for eight. The destination is held while it cannot be reached, so
    nothing is dead-lettered and everything arrives once when it is back."""
    files = ct_series(tmp_path / "ct", 80, rows=128, columns=128)
    scu = {
        "destinations": {
            "A": destination(orthanc_a, max_deliver=3, backoff_max=0.5, echo_interval=1.0)
        },
        "rules": [{"destinations": ["A"]}],
    }
    pipeline = Pipeline(tmp_path / "p", nats_server, local_storage(tmp_path), scu=scu).start()
    results: list[StoreResult] = []
    sender = threading.Thread(target=lambda: results.append(pipeline.send(files)))
    try:
        sender.start()
        wait_for("the first instances in Orthanc", lambda: len(orthanc_a.instances()) >= 5)
        orthanc_a.kill()  # the PACS goes away in the middle of the batch
        wait_for("A held", lambda: "unreachable" in pipeline.logs("scu-gateway"))
        assert destination_up(pipeline, "A") == 0
        time.sleep(OUTAGE_SECONDS)  # the outage itself, many retry budgets long
        assert pipeline.dead_letters() == []
        assert destination_up(pipeline, "A") == 0
        # Only requests in flight when it went down spent an attempt: one per worker
        # (four per association) at most, not one per queued instance and probe.
        failures = pipeline.logs("scu-gateway").count("deliver-A: transient failure")
        assert 1 <= failures <= 8, failures
        orthanc_a.start()  # same ports, same storage: the PACS is back
        sender.join(timeout=120)
        assert results and results[0].statuses() == ["Success"] * len(files), results
        wait_for("all in Orthanc", lambda: len(orthanc_a.instances()) == len(files), 90)
        wait_for("an empty DELIVERY queue", lambda: pipeline.pending_deliveries() == 0)
        assert_identical(orthanc_a, files)
        logs = pipeline.logs("scu-gateway")
        assert delivered_lines(pipeline, "A") == len(files)  # one successful C-STORE each
        assert "cannot associate with A" in logs and "reachable again after" in logs
        assert destination_up(pipeline, "A") == 1
        # Associations are reused: a handful were opened for 80 instances.
        assert logs.count("association open") <= 8, logs.count("association open")
        assert pipeline.dead_letters() == []
    finally:
        sender.join(timeout=60)
        pipeline.stop()


def test_rejecting_destination_dead_letters_then_replay_and_send_study(
    tmp_path: Path, nats_server: NatsServer, orthanc_a: Orthanc, orthanc_b: Orthanc
) -> None:
    study = generate_uid()
    series = [generate_uid(), generate_uid()]
    folder = tmp_path / "study"
    folder.mkdir()
    files = [
        made(
            write_dicom(
                dataset(
                    CTImageStorage,
                    modality="CT",
                    study_uid=study,
                    series_uid=series[i % 2],
                    seed=i,
                ),
                folder / f"{i}.dcm",
            )
        )
        for i in range(4)
    ]
    other = ct_series(tmp_path / "other", 2)  # another study: must not be sent
    scu = {
        "destinations": {
            "GOOD": destination(orthanc_a),
            # Orthanc B checks the called AE: this one it does not know.
            "PACS": destination(orthanc_b, ae_title="NOT_ORTHANC"),
        },
        "rules": [{"study_uid": study, "destinations": ["PACS"]}],
    }
    pipeline = Pipeline(tmp_path / "p", nats_server, local_storage(tmp_path), scu=scu).start()
    try:
        sent = pipeline.send(files + other)
        assert sent.statuses() == ["Success"] * 6, sent.output
        letters = wait_for("4 dead letters", lambda: _letters(pipeline, 4))
        assert all("rejected the association" in d["reason"] for d in letters), letters
        assert all("Rejected Permanent" in d["reason"] for d in letters), letters
        # Permanent: dead-lettered on the first attempt, never retried (even when Orthanc
        # closes before pynetdicom reads the rejection: test_association_rejection.py).
        assert all(d["deliveries"] == 1 for d in letters), letters
        assert {d["sop_instance_uid"] for d in letters} == {f.sop_instance_uid for f in files}
        assert orthanc_b.instances() == {}

        # `send --study` delivers the whole study (and nothing else) to GOOD.
        pipeline.wait_stored(6)
        out = pipeline.cli("send", "--to", "GOOD", "--study", study)
        assert out.returncode == 0, out.stderr
        wait_for("the study in Orthanc A", lambda: len(orthanc_a.instances()) >= 4)
        wait_for("an empty DELIVERY queue", lambda: pipeline.pending_deliveries() == 0)
        assert_identical(orthanc_a, files)

        # Fix the configuration, restart the scu-gateway, replay: delivered.
        scu["destinations"]["PACS"]["ae_title"] = orthanc_b.ae_title
        pipeline.write_config()
        pipeline.stages["scu-gateway"].stop()
        pipeline.start("scu-gateway")
        replay = pipeline.cli("dlq", "replay")
        assert replay.returncode == 0, replay.stderr
        wait_for("the replayed study in Orthanc B", lambda: len(orthanc_b.instances()) >= 4)
        assert_identical(orthanc_b, files)
        assert pipeline.dead_letters() == []
        assert _letters(pipeline, 0) == []
    finally:
        pipeline.stop()


def _letters(pipeline: Pipeline, count: int) -> list[dict[str, Any]]:
    out = pipeline.cli("dlq", "ls", "--json")
    assert out.returncode == 0, out.stderr
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows if len(rows) == count else []


def test_relay_rule_delivers_before_storage_and_each_instance_once(
    tmp_path: Path, nats_server: NatsServer, orthanc_a: Orthanc, orthanc_b: Orthanc
) -> None:
    """The store writer is not running: a relay rule still delivers, from the sealed
    bytes on SEALED, and the plain rule waits for storage. A body too large to travel
    inline (here 2 MiB, above the 1 MiB max_payload) is relayed once stored instead.
    Once everything is stored, nothing relayed is delivered a second time."""
    small = ct_series(tmp_path / "ct", 6)
    big = ct_series(tmp_path / "big", 1, rows=1024, columns=1024)
    files = small + big
    scu = {
        "destinations": {"ENTERPRISE": destination(orthanc_a), "CLOUD": destination(orthanc_b)},
        "rules": [
            {"modality": "CT", "destinations": ["ENTERPRISE"], "relay": True},
            {"modality": "CT", "destinations": ["CLOUD"]},
        ],
    }
    pipeline = Pipeline(tmp_path / "p", nats_server, local_storage(tmp_path), scu=scu)
    pipeline.start("encryptor", "scp-gateway", "scu-gateway")  # no store writer
    try:
        sent = pipeline.send(files)
        assert sent.statuses() == ["Success"] * len(files), sent.output
        wait_for("the relayed instances", lambda: len(orthanc_a.instances()) >= len(small))
        assert_identical(orthanc_a, small)  # byte-identical, and the blob is not among them
        assert pipeline.records() == {}  # nothing is stored yet
        assert orthanc_b.instances() == {}  # the plain rule waits for storage

        pipeline.start("store-writer")
        assert len(pipeline.wait_stored(len(files))) == len(files)
        wait_for("CLOUD's copies", lambda: len(orthanc_b.instances()) >= len(files))
        wait_for("the blob-sized one", lambda: len(orthanc_a.instances()) >= len(files))
        wait_for("an empty DELIVERY queue", lambda: pipeline.pending_deliveries() == 0)
        assert_identical(orthanc_a, files)
        assert_identical(orthanc_b, files)
        assert delivered_lines(pipeline, "ENTERPRISE") == len(files)  # each once
        assert delivered_lines(pipeline, "CLOUD") == len(files)
        assert pipeline.dead_letters() == []

        # Without a relay rule the relay consumer goes: its interest would hold SEALED.
        scu["rules"] = [{"modality": "CT", "destinations": ["CLOUD"]}]
        pipeline.write_config()
        pipeline.stages["scu-gateway"].stop()
        pipeline.start("scu-gateway")
        assert "no rule relays any more: removed the scu-relay consumer" in pipeline.logs(
            "scu-gateway"
        )
    finally:
        pipeline.stop()
