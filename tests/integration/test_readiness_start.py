"""/readyz answers 200 as soon as a stage has started, not one readiness interval later."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dicomflow.embedded.natsserver import NatsServer
from support.pipeline import Pipeline

pytestmark = pytest.mark.integration

INTERVAL = 120.0  # seconds between readiness checks: far longer than the test may wait
SOON = 5.0  # seconds after a stage logged that it is ready


def _ready(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as rsp:
            return int(rsp.status)
    except urllib.error.HTTPError as exc:
        exc.close()  # a 503's response holds the connection: closed, not left to the collector
        return exc.code


def test_ready_as_soon_as_started(tmp_path: Path, nats_server: NatsServer) -> None:
    """Checks run at `started()`: with a two-minute interval, each stage (NATS checked;
    object storage too for the store-writer) is ready within seconds of its start."""
    pipeline = Pipeline(
        tmp_path / "p",
        nats_server,
        {"backend": "local", "local_path": tmp_path / "objects"},
        extra={"telemetry": {"readiness_interval": INTERVAL}},
    )
    names = ("store-writer", "encryptor", "scp-gateway")
    pipeline.start(*names)
    try:
        for name in names:
            port = pipeline.metrics_port(name)
            deadline = time.monotonic() + SOON
            while _ready(port) != 200:
                assert time.monotonic() < deadline, f"{name} not ready {SOON} s after its start"
                time.sleep(0.1)
    finally:
        pipeline.stop()
