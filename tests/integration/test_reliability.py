"""Faults during a batch: kill -9 of stages, NATS going away and coming back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import ct_series
from support.pipeline import Pipeline, StoreResult

pytestmark = pytest.mark.integration


def _objects(folder: Path) -> list[Path]:
    """Objects as the local store lists them. A store-writer killed mid-write leaves the
    backend's staging file ``NAME#N`` behind (obstore writes there, then renames); it is
    never listed nor read as an object, and the rewrite after restart lands in ``NAME``."""
    return [p for p in folder.rglob("*") if p.is_file() and "#" not in p.name]


def test_kill9_of_encryptor_and_store_writer_mid_batch(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    files = ct_series(tmp_path / "in", 120, rows=256, columns=256)
    objects = tmp_path / "objects"
    pipeline = Pipeline(tmp_path / "p", nats_server, {"backend": "local", "local_path": objects})
    pipeline.start()
    results: list[StoreResult] = []
    sender = threading.Thread(target=lambda: results.append(pipeline.send(files)))
    try:
        sender.start()
        kills = 0
        for threshold in (10, 40, 70):
            while len(_objects(objects)) < threshold and sender.is_alive():
                time.sleep(0.02)
            pipeline.kill("encryptor")
            pipeline.kill("store-writer")
            kills += 2
            time.sleep(0.3)  # work piles up in INGEST while both are down
            pipeline.start("store-writer", "encryptor")
        sender.join(timeout=300)
        assert results and results[0].statuses() == ["Success"] * len(files), results
        assert kills == 6

        stored = pipeline.wait_stored(len(files))
        pipeline.wait_drained()
        # L1: every instance answered Success is stored and decrypts to the same digest.
        assert set(stored) == {f.sop_instance_uid for f in files}
        verify = pipeline.cli("verify")
        assert verify.returncode == 0, verify.stdout
        assert f'"verified": {len(files)}' in verify.stdout
        # L2 and L4: nothing unexpected, exactly one object per instance.
        assert len(_objects(objects)) == len(files)
        # L5: nothing dead-lettered.
        assert pipeline.dead_letters() == []
    finally:
        sender.join(timeout=60)
        pipeline.stop()


def test_nats_down_answers_out_of_resources_then_recovers(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    first, second = ct_series(tmp_path / "in", 2)
    pipeline = Pipeline(
        tmp_path / "p", nats_server, {"backend": "local", "local_path": tmp_path / "objects"}
    )
    pipeline.start()
    try:
        nats_server.stop()
        down = pipeline.send([first])
        assert down.statuses() == ["Refused: OutOfResources"], down.output  # 0xA700
        assert "Success" not in down.statuses()

        nats_server.start()  # same port, same JetStream folder
        deadline = time.monotonic() + 60
        while True:  # the gateway reconnects by itself; no restart
            again = pipeline.send([second])
            if again.statuses() == ["Success"] or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert again.statuses() == ["Success"], again.output
        stored = pipeline.wait_stored(1)
        assert second.sop_instance_uid in stored
        assert pipeline.stages["scp-gateway"].restarts == 0
        assert pipeline.stages["scp-gateway"].exit_code() is None
    finally:
        pipeline.stop()


def test_full_ingest_stream_answers_out_of_resources_until_drained(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    files = ct_series(tmp_path / "in", 6, rows=256, columns=256)  # ~128 KiB each
    pipeline = Pipeline(
        tmp_path / "p",
        nats_server,
        {"backend": "local", "local_path": tmp_path / "objects"},
        extra={"nats": {"ingest_max_bytes": 300_000}},
    )
    pipeline.start("store-writer", "scp-gateway")  # no encryptor: INGEST fills up
    try:
        full = pipeline.send(files[:3])  # storescu halts at the first failure
        statuses = full.statuses()
        assert statuses[:2] == ["Success", "Success"], full.output
        assert statuses[2:] == ["Refused: OutOfResources"], full.output

        pipeline.start("encryptor")
        pipeline.wait_stored(2)
        for made in files[2:]:  # room for one more each time the encryptor has drained it
            pipeline.wait_drained()
            again = pipeline.send([made])
            assert again.statuses() == ["Success"], again.output
        assert len(pipeline.wait_stored(6)) == 6
    finally:
        pipeline.stop()
