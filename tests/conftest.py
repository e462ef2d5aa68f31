"""Fixtures that start real servers on loopback: nats-server, moto (S3)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomflow.embedded.natsserver import NatsServer
from support.pipeline import STORESCU
from support.servers import MotoServer


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "jetstream") as server:
        yield server


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoServer]:
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _dcmtk_present() -> None:
    # The test command installs DCMTK; without it the integration tests would be meaningless.
    missing = [
        t for t in (STORESCU, "/usr/bin/dcmcjpeg", "/usr/bin/dcmcrle") if not Path(t).exists()
    ]
    if missing or shutil.which("dcmconv") is None:
        pytest.fail(f"DCMTK is not installed ({missing}); run scripts/test, which installs it")
