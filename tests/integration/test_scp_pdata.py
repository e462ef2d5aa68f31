"""The scp-gateway's own C-STORE data phase (``scp_gateway.pdata``) against DCMTK.

A pynetdicom SCP set up as the gateway sets up its connections (spooled datasets, the
reactors' wake-ups, ``ConnectionLimits``, which installs ``pdata``) receives from DCMTK's
``storescu`` and ``echoscu``: each dataset arrives byte for byte whatever the PDU size,
C-STOREs are taken past pynetdicom's DIMSE provider while a C-ECHO still goes through it,
a request broken off mid-dataset leaves no file, and on a pynetdicom the patch was not
verified on the same exchange goes through pynetdicom only, as correct.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pynetdicom
import pytest
from dicomflow.scp_gateway import pdata
from dicomflow.scp_gateway.service import ConnectionLimits
from dicomflow.scp_gateway.spool import Spool
from dicomflow.shared import patches
from dicomflow.shared.patches import reactors
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from support.dicomfiles import Made, ct_series, dataset_bytes
from support.servers import free_port

pytestmark = pytest.mark.integration


class Scp:
    """A pynetdicom SCP with the gateway's connection set-up; what it received."""

    def __init__(self, spool: Spool, maximum_pdu_size: int) -> None:
        self.spool = spool
        self.received: dict[str, bytes] = {}
        self.by_pynetdicom: list[str] = []  # DIMSE messages pynetdicom's provider decoded
        self.installed: list[bool] = []
        self.port = free_port()
        ae = AE("GW")
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = maximum_pdu_size
        limits = ConnectionLimits(10.0, maximum_pdu_size)
        self.ae = ae
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, limits.on_open),
                (evt.EVT_CONN_OPEN, self._watch),
                (evt.EVT_C_STORE, self._store),
                (evt.EVT_C_ECHO, lambda event: 0x0000),
                *((e, spool.on_association_end) for e in (evt.EVT_ABORTED, evt.EVT_CONN_CLOSE)),
            ],
        )

    def _watch(self, event: Any) -> None:
        dul = event.assoc.dul
        reader = getattr(dul._read_pdu_data, "__self__", None)
        self.installed.append(isinstance(reader, pdata.Reader))
        dimse = event.assoc.dimse
        original = dimse.receive_primitive

        def receive_primitive(primitive: Any) -> None:
            self.by_pynetdicom.append("P-DATA")
            original(primitive)

        dimse.receive_primitive = receive_primitive

    def _store(self, event: Any) -> int:
        path = Path(event.dataset_path)
        received = self.spool.received(path)
        data = received.data if received.data is not None else path.read_bytes()
        self.received[str(event.request.AffectedSOPInstanceUID)] = data
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Spool]:
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # install() sets it
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)
    reactors.install()
    opened = Spool.open(None, tmp_path / "spool", 64 * 1024**2)
    opened.install()
    opened.keep_in_memory(32 * 1024)  # some datasets in memory, others in files
    yield opened
    opened.close()


def _storescu(port: int, files: list[Made], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-xs", "-aec", "GW", *args, "127.0.0.1", str(port)]
        + [str(f.path) for f in files],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("pdu", [4096, 16384, 0])
def test_many_fragments_arrive_whole_past_the_dimse_provider(
    tmp_path: Path, spool: Spool, pdu: int
) -> None:
    files = ct_series(tmp_path / "in", 6, rows=160, columns=160)  # ~50 KiB: 13 PDUs at 4 KiB
    scp = Scp(spool, pdu)
    try:
        sent = _storescu(scp.port, files, "--max-pdu", str(pdu or 131072))
        assert sent.returncode == 0, sent.stderr
        assert "Success" in sent.stderr or sent.stderr == ""
    finally:
        scp.close()
    assert scp.installed and all(scp.installed)
    assert scp.by_pynetdicom == []  # every C-STORE taken by pdata
    assert set(scp.received) == {f.sop_instance_uid for f in files}
    for f in files:
        body = dataset_bytes(f.path)
        got = scp.received[f.sop_instance_uid]
        assert got.endswith(body)
        assert got[: -len(body)] == pdata.part10_head(
            f.sop_class_uid, f.sop_instance_uid, str(ExplicitVRLittleEndian)
        )
    assert not list(spool.path.glob("*.dcm"))


def test_echo_goes_through_pynetdicom(spool: Spool) -> None:
    scp = Scp(spool, 16384)
    try:
        echo = subprocess.run(
            ["echoscu", "-aec", "GW", "127.0.0.1", str(scp.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        scp.close()
    assert echo.returncode == 0, echo.stderr
    assert all(scp.installed)
    assert scp.by_pynetdicom == ["P-DATA"]  # the C-ECHO-RQ, decoded by pynetdicom


def test_off_on_another_pynetdicom_still_stores(
    tmp_path: Path, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = ct_series(tmp_path / "in", 3, rows=160, columns=160)
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    assert patches.SCP_PDATA.install() is False
    scp = Scp(spool, 4096)
    try:
        sent = _storescu(scp.port, files, "--max-pdu", "4096")
    finally:
        scp.close()
        monkeypatch.undo()
        patches.SCP_PDATA.admit()
    assert sent.returncode == 0, sent.stderr
    assert scp.installed and not any(scp.installed)
    assert len(scp.by_pynetdicom) > 3 * 10  # every PDU through pynetdicom
    assert {uid: data[132:][-10:] for uid, data in scp.received.items()} == {
        f.sop_instance_uid: dataset_bytes(f.path)[-10:] for f in files
    }
