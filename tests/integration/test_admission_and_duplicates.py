"""Who may send, what the gateway refuses, duplicates, and tampering at rest."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, ct_series, dataset_bytes, made
from support.pipeline import Pipeline

pytestmark = pytest.mark.integration


@pytest.fixture
def pipeline(tmp_path: Path, nats_server: NatsServer) -> Pipeline:
    p = Pipeline(
        tmp_path / "p", nats_server, {"backend": "local", "local_path": tmp_path / "objects"}
    ).start()
    yield p  # type: ignore[misc]
    p.stop()


def test_unknown_calling_or_called_ae_is_rejected(tmp_path: Path, pipeline: Pipeline) -> None:
    (f,) = ct_series(tmp_path / "in", 1)
    wrong_calling = pipeline.storescu([f.path], calling="INTRUDER")
    assert "Association Rejected" in wrong_calling.output
    wrong_called = pipeline.storescu([f.path], called="NOTDICOMFLOW")
    assert "Association Rejected" in wrong_called.output
    assert wrong_calling.statuses() == wrong_called.statuses() == []
    time.sleep(1)
    assert pipeline.records() == {}


def test_dataset_without_study_uid_gets_a_failure_status(
    tmp_path: Path, pipeline: Pipeline
) -> None:
    (f,) = ct_series(tmp_path / "in", 1)
    ds = dcmread(f.path)
    del ds.StudyInstanceUID
    ds.save_as(f.path, enforce_file_format=True)
    result = pipeline.send(
        [Made(f.path, f.sop_instance_uid, "", f.series_uid, f.sop_class_uid, f.transfer_syntax)]
    )
    assert result.statuses() == ["Error: DataSetDoesNotMatchSOPClass"], result.output  # 0xA900
    time.sleep(1)
    assert pipeline.records() == {}


def test_same_instance_twice_is_one_object_and_a_changed_one_is_rejected(
    tmp_path: Path, pipeline: Pipeline
) -> None:
    (f,) = ct_series(tmp_path / "in", 1)
    assert pipeline.send([f]).statuses() == ["Success"]
    assert pipeline.send([f]).statuses() == ["Success"]
    pipeline.wait_stored(1)
    pipeline.wait_drained()
    objects = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 1
    assert len(pipeline.records()) == 1
    assert pipeline.dead_letters() == []

    changed = tmp_path / "changed.dcm"
    ds = dcmread(f.path)
    ds.InstanceNumber = 99  # same SOP Instance UID, different bytes
    ds.save_as(changed, enforce_file_format=True)
    assert pipeline.send([made(changed)]).statuses() == ["Success"]
    deadline = time.monotonic() + 60
    while not pipeline.dead_letters() and time.monotonic() < deadline:
        time.sleep(0.3)
    (letter,) = pipeline.dead_letters()
    assert letter["Dicomflow-Dlq-Stage"] == "store-writer"
    assert "DuplicateConflict" in letter["Dicomflow-Dlq-Reason"]
    assert letter["Dicomflow-Sop-Instance-Uid"] == f.sop_instance_uid
    # The first version is untouched.
    assert [p for p in (tmp_path / "objects").rglob("*") if p.is_file()] == objects
    out = tmp_path / "out.dcm"
    assert pipeline.cli("get", f.sop_instance_uid, "-o", str(out)).returncode == 0
    assert dataset_bytes(out) == dataset_bytes(f.path)


def test_flipped_byte_at_rest_fails_get_and_verify(tmp_path: Path, pipeline: Pipeline) -> None:
    files = ct_series(tmp_path / "in", 2)
    assert pipeline.send(files).statuses() == ["Success"] * 2
    stored = pipeline.wait_stored(2)
    victim = files[0].sop_instance_uid
    path = tmp_path / "objects" / stored[victim]["object_key"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    out = tmp_path / "out.dcm"
    got = pipeline.cli("get", victim, "-o", str(out))
    assert got.returncode == 1
    assert "integrity check failed" in got.stderr
    assert not out.exists()

    verify = pipeline.cli("verify")
    assert verify.returncode == 1
    assert f"FAIL {victim}: integrity check failed" in verify.stdout
    assert '"verified": 1, "failed": 1' in verify.stdout
