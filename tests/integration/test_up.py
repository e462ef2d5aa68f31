"""`dicomflow up`, the embedded default, as a user runs it: start, send, read, stop, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.dicomfiles import ct_series, dataset_bytes
from support.pipeline import STORESCU
from support.servers import free_port, wait_for_port

pytestmark = pytest.mark.integration


def _up(data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dicomflow",
                "up",
                "--data-dir",
                str(data),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--allow-ae",
                "CT01",
                "--metrics-port",
                "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomflow", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _send(port: int, path: Path, calling: str = "CT01") -> str:
    done = subprocess.run(
        [STORESCU, "-v", "-aet", calling, "-aec", "DICOMFLOW", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    return done.stdout + done.stderr


def _wait_listed(data: Path, uid: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = _cli("ls", "--data-dir", str(data)).stdout
        if uid in listed and "stored" in listed:
            return listed
        time.sleep(0.5)
    raise AssertionError(f"{uid} not stored")


def _stop(proc: subprocess.Popen[bytes], *, twice: bool = False) -> int:
    proc.send_signal(signal.SIGTERM)
    if twice:  # Ctrl-C pressed again and again, a supervisor's TERM: must never hang
        for _ in range(500):
            proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=90)


def test_up_stores_reads_back_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    first, second = ct_series(tmp_path / "in", 2)
    data, log, port = tmp_path / "data", tmp_path / "up.log", free_port()

    proc = _up(data, port, log)
    try:
        wait_for_port(port, timeout=90)
        banner = log.read_text()
        assert "DEVELOPMENT master key" in banner
        assert (data / "keys" / "master-1.key").stat().st_mode & 0o777 == 0o600
        assert "Received Store Response (Success)" in _send(port, first.path)
        assert "Association Rejected" in _send(port, first.path, calling="STORESCU")
        _wait_listed(data, first.sop_instance_uid)
        out = tmp_path / "first.dcm"
        got = _cli("get", "--data-dir", str(data), first.sop_instance_uid, "-o", str(out))
        assert got.returncode == 0, got.stderr
        assert dataset_bytes(out) == dataset_bytes(first.path)
    finally:
        code = _stop(proc, twice=True)
    assert code == 0, log.read_text()[-3000:]
    assert "dicomflow: stopped." in log.read_text()

    # A second `up` on the same folder resumes: same key, same index, same objects.
    proc = _up(data, port, log)
    try:
        wait_for_port(port, timeout=90)
        assert "using the development master key" in log.read_text()
        assert "Received Store Response (Success)" in _send(port, second.path)
        listed = _wait_listed(data, second.sop_instance_uid)
        assert first.sop_instance_uid in listed
        verify = _cli("verify", "--data-dir", str(data))
        assert verify.returncode == 0
        assert '"verified": 2' in verify.stdout
    finally:
        assert _stop(proc) == 0
