"""`dicomflow import`: folders of files into the pipeline, exact counts, kill and re-run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from dicomflow.shared.contracts import messages, subjects
from pydicom.uid import CTImageStorage

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, ct_series, dataset, with_pixel_bytes, write
from support.pipeline import Pipeline

pytestmark = pytest.mark.integration


def _folder(root: Path, unique: int, copies: int, junk: int, no_uid: int) -> list[Made]:
    """``unique`` instances in nested folders, byte-identical copies under other names,
    files that are not DICOM (text, a truncated Part-10 file), and datasets without a
    Series Instance UID."""
    made = ct_series(root / "a", unique - unique // 3, rows=16, columns=16)
    made += ct_series(root / "b" / "c", unique // 3, rows=16, columns=16)
    (root / "copies").mkdir()
    for i, m in enumerate(made[:copies]):
        shutil.copy(m.path, root / "copies" / f"copy-{i}.dcm")
    (root / "junk").mkdir()
    for i in range(junk):
        if i % 2:
            (root / "junk" / f"notes-{i}.txt").write_text("not a DICOM file\n" * (i + 1))
        else:
            (root / "junk" / f"cut-{i}.dcm").write_bytes(made[i].path.read_bytes()[:100])
    for i in range(no_uid):
        ds = dataset(CTImageStorage, modality="CT", rows=8, columns=8, seed=900 + i)
        del ds.SeriesInstanceUID
        write(ds, root / "junk" / f"no-series-{i}.dcm")
    return made


def _import(pipeline: Pipeline, *paths: Path) -> dict[str, int]:
    done = pipeline.cli("import", *map(str, paths))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "import " in done.stderr  # progress
    counts: dict[str, int] = json.loads(done.stdout.splitlines()[-1])
    return counts


def test_import_counts_kill_rerun_and_store_once(tmp_path: Path, nats_server: NatsServer) -> None:
    objects = tmp_path / "objects"
    pipeline = Pipeline(
        tmp_path / "p", nats_server, {"backend": "local", "local_path": objects}
    ).start("store-writer", "encryptor")
    try:
        big = _folder(tmp_path / "big", unique=240, copies=20, junk=14, no_uid=6)

        # Interrupted: SIGKILL once the first progress line is out, then run again.
        proc = subprocess.Popen(
            [sys.executable, "-m", "dicomflow", "import", str(tmp_path / "big")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, DICOMFLOW_CONFIG=str(pipeline.config)),
        )
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("import "):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(60)
        proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL
        assert len(pipeline.wait_stored(1, timeout=30)) < len(big)

        rerun = _import(pipeline, tmp_path / "big")
        assert rerun["rejected"] == 20
        assert rerun["accepted"] + rerun["duplicate"] == 240 + 20
        stored = pipeline.wait_stored(240, timeout=120)
        pipeline.wait_drained()
        assert set(pipeline.records()) == {m.sop_instance_uid for m in big}
        assert set(stored) == {m.sop_instance_uid for m in big}
        assert len([p for p in objects.rglob("*") if p.is_file()]) == 240
        assert pipeline.dead_letters() == []

        # Once everything is stored, a third run only finds duplicates.
        assert _import(pipeline, tmp_path / "big") == {
            "accepted": 0,
            "duplicate": 260,
            "conflict": 0,
            "rejected": 20,
        }

        # A fresh folder, uninterrupted: exact counts; a file and a folder as arguments.
        small = _folder(tmp_path / "small", unique=30, copies=5, junk=4, no_uid=2)
        extra = tmp_path / "one.dcm"
        shutil.copy(small[0].path, extra)
        assert _import(pipeline, tmp_path / "small", extra) == {
            "accepted": 30,
            "duplicate": 6,
            "conflict": 0,
            "rejected": 6,
        }
        pipeline.wait_stored(270, timeout=60)
        back = tmp_path / "back.dcm"
        got = pipeline.cli("get", small[3].sop_instance_uid, "-o", str(back))
        assert got.returncode == 0, got.stderr
        assert back.read_bytes() == small[3].path.read_bytes()  # the file as it was
    finally:
        pipeline.stop()


def test_import_refuses_what_the_gateway_refuses(tmp_path: Path, nats_server: NatsServer) -> None:
    """`import` admits as the gateway does: a file over scp.max_dataset_bytes and a file
    whose message the contract refuses (a transfer syntax that is no UID) are rejected,
    each named with the reason, and nothing of them reaches INGEST."""
    limit = 64 * 1024
    pipeline = Pipeline(
        tmp_path / "p",
        nats_server,
        {"backend": "local", "local_path": tmp_path / "objects"},
        extra={"scp": {"max_dataset_bytes": limit}},
    )
    (ok,) = ct_series(tmp_path / "ok", 1, rows=16, columns=16)
    big = with_pixel_bytes(tmp_path / "big.dcm", limit + 1)
    bad = tmp_path / "bad-syntax.dcm"
    data = ct_series(tmp_path / "bad", 1, rows=16, columns=16)[0].path.read_bytes()
    syntax = b"1.2.840.10008.1.2.1\x00"  # Explicit VR Little Endian, padded to even
    assert data.count(syntax) == 1
    bad.write_bytes(data.replace(syntax, b"1.2.840.10008.1.2.1A"))  # same length: parses

    done = pipeline.cli("import", "--verbose", str(ok.path), str(big.path), str(bad))
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "accepted": 1,
        "duplicate": 0,
        "conflict": 0,
        "rejected": 2,
    }, done.stderr
    size = big.path.stat().st_size
    assert (
        f"rejected {big.path}: dataset of {size} bytes exceeds scp.max_dataset_bytes "
        f"({limit} bytes)" in done.stderr
    )
    assert (
        f"rejected {bad}: not publishable: Dicomflow-Transfer-Syntax is missing or not a "
        "DICOM UID" in done.stderr
    )
    assert asyncio.run(_ingest_uids(nats_server.url)) == [ok.sop_instance_uid]


async def _ingest_uids(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.INGEST_STREAM)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            msg = await js.get_msg(subjects.INGEST_STREAM, seq)
            out.append((msg.headers or {})[messages.H_SOP_INSTANCE])
        return out
    finally:
        await nc.close()
