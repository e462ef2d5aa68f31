"""`dicomflow import`: folders of files into the pipeline, exact counts, kill and re-run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, ct_series, dataset, write
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
