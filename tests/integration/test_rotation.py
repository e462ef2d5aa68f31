"""Key rotation through the real pipeline: new key for new objects, `rekey`, retiring a key;
and rotating the encryptor's signing key (store-writers trust the new key first).

Stored on the local backend: the storage operations `rekey` uses (ranged GET, GET,
overwriting PUT) are the ones test_backends drives on S3, Azurite and GCS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from dicomflow.shared.contracts import messages, subjects
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.crypto.envelope import seal
from dicomflow.shared.crypto.keyring import generate_master_key_file, load_master_key
from dicomflow.shared.crypto.sealsign import generate_signing_key_pair, load_signing_key
from dicomflow.shared.stage.consumer import H_DLQ_REASON, H_DLQ_STAGE

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import ct_series
from support.pipeline import Pipeline
from support.servers import wait_for

pytestmark = pytest.mark.integration

OLD_BATCH = 120


def _status(pipeline: Pipeline) -> dict[str, int]:
    done = pipeline.cli("keys", "status", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    keys: dict[str, int] = json.loads(done.stdout.splitlines()[-1])["keys"]
    return keys


def _rotate(pipeline: Pipeline, new_key: Path, *, keep_old: bool) -> None:
    encryption = {
        "master_key": {"id": 2, "path": new_key},
        "previous_keys": [{"id": 1, "path": pipeline.key}] if keep_old else [],
    }
    pipeline.extra["encryption"] = encryption
    pipeline.write_config()


def test_rotate_rekey_resume_and_retire_the_old_key(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    objects = tmp_path / "objects"
    pipeline = Pipeline(
        tmp_path / "p", nats_server, {"backend": "local", "local_path": objects, "layout": "flat"}
    ).start()
    try:
        old = ct_series(tmp_path / "old", OLD_BATCH, rows=32, columns=32)
        assert pipeline.send(old).statuses() == ["Success"] * OLD_BATCH
        pipeline.wait_stored(OLD_BATCH)
        assert _status(pipeline) == {"1": OLD_BATCH}

        # Rotate: key 2 current, key 1 previous; the encryptor restarts on the new config.
        key2 = tmp_path / "p" / "keys" / "master-2.key"
        generate_master_key_file(key2)
        _rotate(pipeline, key2, keep_old=True)
        pipeline.stages["encryptor"].stop()
        pipeline.start("encryptor")
        new = ct_series(tmp_path / "new", 3, rows=32, columns=32)
        assert pipeline.send(new).statuses() == ["Success"] * 3
        records = pipeline.wait_stored(OLD_BATCH + 3)
        assert {records[f.sop_instance_uid]["key_id"] for f in new} == {2}
        assert {records[f.sop_instance_uid]["key_id"] for f in old} == {1}
        assert _status(pipeline) == {"1": OLD_BATCH, "2": 3}
        verify = pipeline.cli("verify")
        assert verify.returncode == 0, verify.stdout

        dry = pipeline.cli("rekey", "--to", "2", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert json.loads(dry.stdout.splitlines()[-1])["would-rekey"] == OLD_BATCH
        assert _status(pipeline) == {"1": OLD_BATCH, "2": 3}

        wrong = pipeline.cli("rekey", "--to", "3")
        assert wrong.returncode == 2 and "current master key is 2" in wrong.stderr

        # One old object is tampered with at rest (a flipped ciphertext byte).
        victim = old[7]
        victim_path = objects / records[victim.sop_instance_uid]["object_key"]
        original = victim_path.read_bytes()
        flipped = bytearray(original)
        flipped[100] ^= 0x01
        victim_path.write_bytes(bytes(flipped))

        # Killed half-way: SIGKILL once it has reported some progress.
        _rekey_killed_after(pipeline, progress_lines=15)
        partial = _status(pipeline)
        assert 0 < partial["1"] < OLD_BATCH, partial
        assert partial["1"] + partial["2"] == OLD_BATCH + 3

        # The re-run finishes, and reports the tampered object with the integrity error.
        rerun = pipeline.cli("rekey", "--to", "2")
        assert rerun.returncode == 1, rerun.stdout + rerun.stderr
        summary = json.loads(rerun.stdout.splitlines()[-1])
        assert summary["failed"] == 1
        assert summary["rekeyed"] + summary["already"] == OLD_BATCH + 2
        assert summary["already"] >= 3 + 15 - 4  # the 3 new, and what the killed run did
        assert f"FAIL {victim.sop_instance_uid}: integrity check failed" in rerun.stdout
        assert victim_path.read_bytes() == bytes(flipped)  # left exactly as it was
        assert _status(pipeline) == {"1": 1, "2": OLD_BATCH + 2}

        # With the original bytes back, the last one is re-encrypted too.
        victim_path.write_bytes(original)
        last = pipeline.cli("rekey", "--to", "2")
        assert last.returncode == 0, last.stdout + last.stderr
        assert json.loads(last.stdout.splitlines()[-1])["rekeyed"] == 1
        assert _status(pipeline) == {"2": OLD_BATCH + 3}
        assert {r["key_id"] for r in pipeline.records().values()} == {2}

        # Key 1 retired: everything still decrypts and matches the index.
        _rotate(pipeline, key2, keep_old=False)
        verify = pipeline.cli("verify")
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert f'"verified": {OLD_BATCH + 3}' in verify.stdout
        out = tmp_path / "back.dcm"
        assert pipeline.cli("get", old[0].sop_instance_uid, "-o", str(out)).returncode == 0
    finally:
        pipeline.stop()


def _rekey_killed_after(pipeline: Pipeline, *, progress_lines: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dicomflow", "rekey", "--to", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, DICOMFLOW_CONFIG=str(pipeline.config)),
    )
    assert proc.stderr is not None
    seen = 0
    try:
        for line in proc.stderr:
            if line.startswith("rekey "):
                seen += 1
                if seen >= progress_lines:
                    proc.send_signal(signal.SIGKILL)
                    break
    finally:
        proc.wait(60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"rekey ended on its own after {seen} lines"


def _restart(pipeline: Pipeline, stage: str, **encryption: object) -> None:
    pipeline.extra.setdefault("encryption", {}).update(encryption)
    pipeline.write_config()
    pipeline.stages[stage].stop()
    pipeline.start(stage)


def test_signing_key_rotation_stores_everything(tmp_path: Path, nats_server: NatsServer) -> None:
    """Store-writers trust old and new, the encryptor switches, then the old key is retired:
    every instance is stored, and only a message signed by the retired key is refused."""
    pipeline = Pipeline(
        tmp_path / "p", nats_server, {"backend": "local", "local_path": tmp_path / "objects"}
    ).start()
    old_private, old_public = pipeline.signing_key, pipeline.signing_public
    (tmp_path / "new").mkdir()
    new_private, new_public = generate_signing_key_pair(tmp_path / "new")
    new_signer = load_signing_key(new_private, "encryption.signing_key").signer
    batches = [ct_series(tmp_path / f"in{n}", 4, rows=16, columns=16) for n in range(3)]
    try:
        assert pipeline.send(batches[0]).statuses() == ["Success"] * 4
        pipeline.wait_stored(4)

        _restart(pipeline, "store-writer", trusted_signing_keys=[old_public, new_public])
        _restart(pipeline, "encryptor", signing_key=new_private)
        assert f"signing key {new_signer}" in pipeline.logs("encryptor")
        assert pipeline.send(batches[1]).statuses() == ["Success"] * 4
        assert len(pipeline.wait_stored(8)) == 8

        _restart(pipeline, "store-writer", trusted_signing_keys=[new_public])
        assert pipeline.send(batches[2]).statuses() == ["Success"] * 4
        assert len(pipeline.wait_stored(12)) == 12
        assert pipeline.dead_letters() == []

        # A message the retired key signed is no longer trusted.
        asyncio.run(_publish_signed_by(pipeline, old_private))
        (letter,) = wait_for("a dead letter", lambda: pipeline.dead_letters() or None, timeout=30)
        assert letter[H_DLQ_STAGE] == "store-writer"
        assert "which is not among encryption.trusted_signing_keys" in letter[H_DLQ_REASON]
        pipeline.wait_drained()
        assert len(pipeline.records()) == 12
        verify = pipeline.cli("verify")
        assert verify.returncode == 0 and '"verified": 12' in verify.stdout, verify.stdout
    finally:
        pipeline.stop()


async def _publish_signed_by(pipeline: Pipeline, signing_key: Path) -> None:
    plain = os.urandom(1000)
    body = seal(load_master_key(1, pipeline.key), plain)
    instance = Instance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.777.1",
        study_uid="1.2.826.0.1.3680043.8.498.777",
        series_uid="1.2.826.0.1.3680043.8.498.777.0",
        calling_ae="STORESCU",
        called_ae="DICOMFLOW",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=len(plain),
        sha256=hashlib.sha256(plain).hexdigest(),
    ).sealed(1, len(body), hashlib.sha256(body).hexdigest())
    signed = load_signing_key(signing_key, "encryption.signing_key").sign(instance)
    nc = await nats.connect(pipeline.nats.url)
    try:
        subject = subjects.sealed_subject("DICOMFLOW", "STORESCU")
        await nc.jetstream().publish(subject, body, headers=signed.headers(), timeout=10)
    finally:
        await nc.close()
    assert messages.parse(signed.headers(), sealed=True, signed=True) == signed
