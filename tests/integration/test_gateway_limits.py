"""The scp-gateway's input limits on a real gateway: idle connections are closed after
the ARTIM/ACSE timeout, associations beyond ``max_associations`` are refused while the
others keep working, and a dataset over ``max_dataset_bytes`` is refused (0xC211) and
never published."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import ct_series
from support.pipeline import Pipeline

pytestmark = pytest.mark.integration

ACSE_TIMEOUT = 1.5
MAX_ASSOCIATIONS = 2
MAX_DATASET_BYTES = 64 * 1024


@pytest.fixture
def pipeline(tmp_path: Path, nats_server: NatsServer) -> Iterator[Pipeline]:
    p = Pipeline(
        tmp_path / "p",
        nats_server,
        {"backend": "local", "local_path": tmp_path / "objects"},
        extra={
            "scp": {
                "max_associations": MAX_ASSOCIATIONS,
                "acse_timeout": ACSE_TIMEOUT,
                "network_timeout": 5.0,
                "dimse_timeout": 10.0,
                "max_dataset_bytes": MAX_DATASET_BYTES,
            },
        },
    ).start()
    yield p
    p.stop()


def _associate(pipeline: Pipeline) -> Association:
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", pipeline.port, ae_title=pipeline.ae_title)


def _echo_ok(assoc: Association) -> bool:
    status = assoc.send_c_echo()
    return bool(status) and status.Status == 0x0000


def test_a_connection_that_never_associates_is_closed_after_the_acse_timeout(
    pipeline: Pipeline,
) -> None:
    with socket.create_connection(("127.0.0.1", pipeline.port), timeout=30) as idle:
        start = time.monotonic()
        assert idle.recv(1) == b""  # closed by the gateway, nothing sent
        waited = time.monotonic() - start
    assert ACSE_TIMEOUT * 0.8 <= waited < ACSE_TIMEOUT + 5, waited
    assoc = _associate(pipeline)
    assert assoc.is_established and _echo_ok(assoc)
    assoc.release()


def test_associations_beyond_the_limit_are_refused_while_the_others_work(
    pipeline: Pipeline,
) -> None:
    # Pipeline.start's port probe (connect, then close before any A-ASSOCIATE-RQ) keeps
    # an acceptor slot in pynetdicom until its ARTIM timer expires: wait that out.
    time.sleep(ACSE_TIMEOUT + 1)
    held = [_associate(pipeline) for _ in range(MAX_ASSOCIATIONS)]
    try:
        assert [a.is_established for a in held] == [True] * MAX_ASSOCIATIONS
        flood = [_associate(pipeline) for _ in range(3)]
        assert [a.is_rejected for a in flood] == [True, True, True]
        assert all(_echo_ok(a) for a in held)
    finally:
        for a in held:
            a.release()
    # Capacity comes back once the held associations are released.
    deadline = time.monotonic() + 10
    while not (again := _associate(pipeline)).is_established:
        assert time.monotonic() < deadline, "no association accepted after the release"
        time.sleep(0.2)
    assert _echo_ok(again)
    again.release()


def test_a_dataset_over_the_size_limit_is_refused_and_never_published(
    tmp_path: Path, pipeline: Pipeline
) -> None:
    small, big = ct_series(tmp_path / "small", 1, rows=32, columns=32) + ct_series(
        tmp_path / "big", 1, rows=256, columns=256
    )
    assert big.path.stat().st_size > MAX_DATASET_BYTES > small.path.stat().st_size
    assoc = _associate(pipeline)
    try:
        refused = assoc.send_c_store(dcmread(big.path))
        accepted = assoc.send_c_store(dcmread(small.path))
    finally:
        assoc.release()
    assert refused.Status == 0xC211
    assert accepted.Status == 0x0000
    stored = pipeline.wait_stored(1)
    pipeline.wait_drained()
    assert set(pipeline.records()) == set(stored) == {small.sop_instance_uid}
    assert "exceeds scp.max_dataset_bytes" in pipeline.logs("scp-gateway")


def test_a_pdu_longer_than_the_maximum_pdu_size_closes_the_connection_at_once(
    pipeline: Pipeline,
) -> None:
    # A P-DATA-TF header announcing 8 MiB, over the 4 MiB default: refused from the
    # header alone, long before network_timeout (5 s) or the 8 MiB could arrive.
    header = b"\x04\x00" + (8 * 1024**2).to_bytes(4, "big")
    with socket.create_connection(("127.0.0.1", pipeline.port), timeout=30) as peer:
        start = time.monotonic()
        peer.sendall(header + b"\x00" * 1024)
        closed = b""
        with contextlib.suppress(ConnectionResetError):
            closed = peer.recv(1)
        waited = time.monotonic() - start
    assert closed == b"", closed
    assert waited < 2.0, waited
    assert "announced a PDU of 8388608 bytes" in pipeline.logs("scp-gateway")
    # The gateway still serves; the closed connection's association slot is given back
    # when its ACSE wait ends (scp.acse_timeout), so allow for that.
    deadline = time.monotonic() + ACSE_TIMEOUT + 5
    while True:
        assoc = _associate(pipeline)
        if assoc.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert assoc.is_established and _echo_ok(assoc)
    assoc.release()
