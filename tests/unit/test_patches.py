"""The patches of dependencies' internals (shared/patches): every one is on at the locked
versions, and each stays off, with a warning, on a version it was not verified on."""

from __future__ import annotations

import logging
import queue
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynetdicom
import pytest
from dicomflow.scp_gateway.service import ConnectionLimits
from dicomflow.scp_gateway.spool import Spool
from dicomflow.scu_gateway import pdata, response
from dicomflow.shared import patches
from dicomflow.shared.patches import natsio, reactors
from dicomflow.shared.patches.fence import CPYTHON, NATS_PY, PYNETDICOM
from dicomflow.shared.telemetry.metrics import Metrics
from nats.aio import client as nats_client
from nats.protocol import command
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import association as association_module
from pynetdicom import dul as dul_module

from dicomflow.cli import process

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Spool]:
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # install() sets it
    opened = Spool.open(None, tmp_path, 1024)
    yield opened
    opened.close()


def installers(spool: Spool) -> dict[str, Callable[[], bool]]:
    """Each patch's one install call, as the services make it."""
    return {
        "reactors": reactors.install,
        "scu_pdata": pdata.FENCE.install,
        "scu_response": response.FENCE.install,
        "scp_pdata": patches.SCP_PDATA.install,
        "scp_pdu_limit": patches.SCP_PDU_LIMIT.install,
        "scp_tls_server": patches.SCP_TLS_SERVER.install,
        "scp_reuse_port": patches.SCP_REUSE_PORT.install,
        "scp_spool": spool.install,
        "nats_io": natsio.install,
        "process_exit": process.install,
    }


def fastpath_gauge(metrics: Metrics) -> dict[str, float]:
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        if family.name == "dicomflow_fastpath_active":
            return {s.labels["patch"]: s.value for s in family.samples}
    return {}


def locked(name: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if re.split(r"==", line)[0].strip().lower() == name:
            return line.split("==")[1].strip()
    raise AssertionError(f"{name} is not in requirements.lock")


def test_every_patch_is_active_at_the_locked_versions(spool: Spool) -> None:
    install = installers(spool)
    assert set(install) == {fence.patch for fence in patches.ALL}, "a patch without a test"
    for patch, call in install.items():
        assert call() is True, patch
    assert fastpath_gauge(Metrics("scu-gateway")) == dict.fromkeys(install, 1.0)
    versions = {PYNETDICOM: locked("pynetdicom"), NATS_PY: locked("nats-py")}
    versions[CPYTHON] = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for fence in patches.ALL:
        assert versions[fence.library] in fence.verified, fence.patch


def test_dependency_ranges_stop_at_the_verified_minor_versions() -> None:
    """pyproject allows the verified versions and nothing of a later minor version."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {}
    for spec in project["dependencies"]:
        name, _, specifier = spec.partition(">")
        ranges[name.strip()] = SpecifierSet(">" + specifier)
    for library in (PYNETDICOM, NATS_PY):
        verified = [f.verified for f in patches.ALL if f.library == library]
        for version in {v for vs in verified for v in vs}:
            assert version in ranges[library], (library, version)
            major, minor = Version(version).release[:2]
            assert f"{major}.{minor + 1}.0" not in ranges[library], library


@pytest.fixture
def decided_again(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """After the test: the versions put back and every patch decided on them again."""
    yield
    monkeypatch.undo()
    for fence in patches.ALL:
        fence.admit()


OTHER = {
    PYNETDICOM: (pynetdicom, "__version__", "3.1.0", "pynetdicom 3.1.0 is not 3.0.4"),
    NATS_PY: (nats_client, "__version__", "2.17.0", "nats-py 2.17.0 is not 2.16.0"),
    CPYTHON: (sys, "version_info", (3, 99, 0, "final", 0), "CPython 3.99 is not 3.11"),
}


@pytest.mark.parametrize("fence", patches.ALL, ids=lambda fence: fence.patch)
def test_on_another_version_a_patch_stays_off_with_a_warning(
    fence: patches.Fence,
    spool: Spool,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    decided_again: None,
) -> None:
    module, attribute, version, warning = OTHER[fence.library]
    monkeypatch.setattr(module, attribute, version)
    with caplog.at_level(logging.WARNING):
        assert installers(spool)[fence.patch]() is False
    assert f"{warning}, the version the {fence.patch} patch was verified on" in caplog.text
    assert fence.off in caplog.text  # what is lost
    assert fence.active is False
    assert fastpath_gauge(Metrics("x"))[fence.patch] == 0.0
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        installers(spool)[fence.patch]()
    assert not caplog.text  # one warning, not one per call


def test_reactors_off_leave_pynetdicoms_clocks(
    monkeypatch: pytest.MonkeyPatch, decided_again: None
) -> None:
    monkeypatch.setattr(association_module, "time", time)
    monkeypatch.setattr(dul_module, "time", time)
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    assert reactors.install() is False
    assert association_module.time is time
    assert dul_module.time is time


def test_nats_io_off_leaves_nats_py_framing_and_reads(
    monkeypatch: pytest.MonkeyPatch, decided_again: None
) -> None:
    def theirs(*args: Any) -> bytes:
        return b""

    monkeypatch.setattr(command, "pub_cmd", theirs)
    monkeypatch.setattr(nats_client, "DEFAULT_BUFFER_SIZE", 32768)
    monkeypatch.setattr(nats_client, "__version__", "2.17.0")
    assert natsio.install() is False
    assert command.pub_cmd is theirs
    assert nats_client.DEFAULT_BUFFER_SIZE == 32768


def _association() -> Any:
    """An object with every internal pdata and response look for."""
    dimse = SimpleNamespace(message=None, msg_queue=queue.Queue(), receive_primitive=print)
    return SimpleNamespace(
        dimse=dimse,
        get_handlers=lambda event: [],
        _reactor_checkpoint=None,
        _get_valid_context=None,
        _check_received_status=None,
        _is_paused=False,
    )


def test_scu_patches_off_send_and_decode_through_pynetdicom(
    monkeypatch: pytest.MonkeyPatch, decided_again: None
) -> None:
    assoc = _association()
    assert pdata.usable(assoc)
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    assert pdata.FENCE.install() is False
    assert response.FENCE.install() is False
    assert not pdata.usable(assoc)
    response.install(assoc)
    assert assoc.dimse.receive_primitive is print


def test_pdu_limit_off_keeps_the_timeout_but_not_the_size_bound(
    monkeypatch: pytest.MonkeyPatch, decided_again: None
) -> None:
    def recv(nr_bytes: int) -> bytearray:
        return bytearray(nr_bytes)

    timeouts: list[float] = []
    sock = SimpleNamespace(settimeout=timeouts.append)

    def connection() -> Any:
        assoc_socket = SimpleNamespace(socket=sock, recv=recv)
        dul = SimpleNamespace(socket=assoc_socket, _run_loop_delay=0.001)
        return SimpleNamespace(assoc=SimpleNamespace(dul=dul), address=("127.0.0.1", 1))

    on = connection()
    ConnectionLimits(7.0, 1024).on_open(on)
    assert on.assoc.dul.socket.recv is not recv
    with pytest.raises(OSError, match="maximum_pdu_size"):
        on.assoc.dul.socket.recv(10 * 1024**2)

    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    assert patches.SCP_PDU_LIMIT.install() is False
    patches.REACTORS.admit()
    off = connection()
    ConnectionLimits(7.0, 1024, 0.01).on_open(off)
    assert off.assoc.dul.socket.recv is recv
    assert off.assoc.dul._run_loop_delay == 0.001  # no wake-ups: pynetdicom's own poll
    assert timeouts == [7.0, 7.0]


EXIT_SCRIPT = """
import atexit, sys
from pathlib import Path
from dicomflow.cli.process import exit_process

sys.version_info = (3, 99, 0, "final", 0)
atexit.register(lambda: Path(sys.argv[1]).write_text("ran"))
exit_process(3)
"""


def test_process_exit_off_ends_through_pythons_own_shutdown(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXIT_SCRIPT), str(tmp_path / "atexit")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert (tmp_path / "atexit").read_text() == "ran"
    assert "CPython 3.99 is not 3.11, the version the process_exit patch" in done.stderr
