"""Fixtures that start real servers on loopback: nats-server, moto (S3)."""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from dicomflow.embedded.natsserver import NatsServer
from support.pipeline import STORESCU
from support.servers import MotoServer


@pytest.fixture(autouse=True)
def _collect_what_the_test_leaked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Finalize what a test leaked while that test's warning filters still apply.

    pynetdicom drops the socket of a refused connection without closing it; collected
    later, in whichever test the collector happens to run, its ResourceWarning failed an
    unrelated test (CI saw it in a backend test after the fault suite). Collecting at
    each real-server test's teardown charges a leak to the test that made it.
    """
    yield
    if request.node.get_closest_marker("integration") or request.node.get_closest_marker("faults"):
        gc.collect()


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


def pytest_configure(config: pytest.Config) -> None:
    """Hypothesis profiles of the fuzz tests (tests/unit/test_fuzz_*.py and the association
    fuzz): "ci", the default, is the short run of every test command; scripts/fuzz selects
    "fuzz" and sets DICOMFLOW_FUZZ_EXAMPLES. CI keeps no example database."""
    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile(
        "ci", max_examples=40, deadline=None, database=None, suppress_health_check=quiet
    )
    examples = int(os.environ.get("DICOMFLOW_FUZZ_EXAMPLES", "2000"))
    settings.register_profile(
        "fuzz", max_examples=examples, deadline=None, suppress_health_check=quiet
    )
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
