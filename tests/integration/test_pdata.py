"""The scu-gateway's own P-DATA writer (``scu_gateway.pdata``) against real acceptors.

A pynetdicom storage SCP with a small maximum PDU (many fragments), with no maximum at
all, and answering a failure status; DCMTK's storescp for a second implementation.
What arrives must be the file's dataset byte for byte, and the status the SCP's.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomflow.scu_gateway import pdata
from dicomflow.scu_gateway.association import AssociationPool
from dicomflow.scu_gateway.settings import DestinationSettings
from dicomflow.scu_gateway.status import DeliveryDeferred
from pynetdicom import evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from support.dicomfiles import dataset_bytes, with_pixel_bytes
from support.servers import free_port, wait_for_port
from support.storagescp import Scp

EXPLICIT_LE = "1.2.840.10008.1.2.1"
PAIR = (str(SecondaryCaptureImageStorage), EXPLICIT_LE)


@pytest.fixture(autouse=True)
def writes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files pdata.store sent: the tests must go through it, not send_c_store."""
    sent: list[Path] = []
    store = pdata.store

    def counting(assoc: Any, path: Path, write_timeout: float, written: Any = None) -> Any:
        sent.append(path)
        return store(assoc, path, write_timeout, written)

    monkeypatch.setattr(pdata, "store", counting)
    return sent


@pytest.fixture
def scp(request: pytest.FixtureRequest) -> Iterator[Scp]:
    server = Scp(*request.param)
    yield server
    server.close()


def pool(port: int, ae_title: str = "PEER") -> AssociationPool:
    dest = DestinationSettings(ae_title=ae_title, host="127.0.0.1", port=port)
    return AssociationPool("PEER", dest, "DICOMFLOW")


@pytest.mark.parametrize("scp", [(16384,), (0,)], indirect=True, ids=["16k-pdu", "no-limit"])
def test_dataset_arrives_byte_for_byte(scp: Scp, tmp_path: Path, writes: list[Path]) -> None:
    files = [
        with_pixel_bytes(tmp_path / "big.dcm", 300_001, seed=1),  # many PDUs, odd size padded
        with_pixel_bytes(tmp_path / "small.dcm", 10, seed=2),
    ]
    p = pool(scp.port)
    try:
        statuses = [p.store(f.path, PAIR) for f in files]  # one reused association
    finally:
        p.close()
    assert statuses == [0x0000, 0x0000]
    assert writes == [f.path for f in files]
    assert scp.received == [dataset_bytes(f.path) for f in files]


@pytest.mark.parametrize("scp", [(16384, 0xA700)], indirect=True)
def test_failure_status_is_returned(scp: Scp, tmp_path: Path) -> None:
    made = with_pixel_bytes(tmp_path / "a.dcm", 50_000)
    p = pool(scp.port)
    try:
        assert p.store(made.path, PAIR) == 0xA700
    finally:
        p.close()


def test_dcmtk_storescp_receives_the_same_bytes(tmp_path: Path, writes: list[Path]) -> None:
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    proc = subprocess.Popen(
        ["/usr/bin/storescp", "-aet", "PEER", "-od", str(out), "+xa", "-pm", str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        made = with_pixel_bytes(tmp_path / "a.dcm", 1_000_000, seed=3)
        p = pool(port)
        try:
            assert p.store(made.path, PAIR) == 0x0000
        finally:
            p.close()
        assert writes == [made.path]
        deadline = time.monotonic() + 10
        while not list(out.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        (received,) = out.iterdir()
        assert dataset_bytes(received) == dataset_bytes(made.path)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class DroppingScp(Scp):
    """Drops the connection after a few P-DATA PDUs of the first request, as a peer that
    crashes mid-transfer; later associations are served normally."""

    def __init__(self) -> None:
        super().__init__(16384)
        self.dropped = False
        self.server.bind(evt.EVT_PDU_RECV, self._on_pdu)
        self._pdus = 0

    def _on_pdu(self, event: Any) -> None:
        if self.dropped or type(event.pdu).__name__ != "P_DATA_TF":
            return
        self._pdus += 1
        if self._pdus == 4:
            self.dropped = True
            event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)


def test_peer_lost_mid_request_defers_the_delivery_and_the_next_one_succeeds(
    tmp_path: Path, writes: list[Path]
) -> None:
    scp = DroppingScp()
    big = with_pixel_bytes(tmp_path / "big.dcm", 4_000_000, seed=4)  # ~245 PDUs of 16 KiB
    dest = DestinationSettings(
        ae_title="PEER", host="127.0.0.1", port=scp.port, dimse_timeout=5, network_timeout=5
    )
    p = AssociationPool("PEER", dest, "DICOMFLOW")
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryDeferred):
            p.store(big.path, PAIR)
        assert time.monotonic() - started < 30  # neither a hang nor a wait past the timeouts
        assert scp.dropped and not scp.received
        assert p.store(big.path, PAIR) == 0x0000  # a new association, the whole dataset
    finally:
        p.close()
        scp.close()
    assert writes == [big.path, big.path]
    assert scp.received == [dataset_bytes(big.path)]
