"""The scp-gateway's spool on a real gateway: the files of a transfer cut off half-way
are removed when its association ends, a dataset over ``scp.max_dataset_bytes`` stops
being written once it passes the limit (and is answered 0xC211), a dataset that travels
inline is never written to disk, and the spool is a private folder, never the system
temp folder itself.

The sender is pynetdicom, driven PDU by PDU where a transfer must stop half-way or be
watched as it arrives: each P-DATA-TF PDU is written by the test, not by send_c_store.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, dataset_bytes, with_pixel_bytes
from support.pipeline import Pipeline

pytestmark = pytest.mark.integration

PDU = 64 * 1024  # the PDUs the test writes
LIMIT = 4 * 1024**2  # scp.max_dataset_bytes; over the inline limit (about 1 MiB)
INLINE = 512 * 1024  # a dataset under the inline limit of a default nats-server
SETTLE = 10.0  # seconds for the gateway to notice an association's end


def _pipeline(root: Path, nats: NatsServer, scp: dict[str, object] | None = None) -> Pipeline:
    return Pipeline(
        root / "p",
        nats,
        {"backend": "local", "local_path": root / "objects"},
        extra={"scp": {"network_timeout": 10.0, "dimse_timeout": 20.0, **(scp or {})}},
    )


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The service-wide ``spool_dir`` of every stage the test starts (DICOMFLOW_SPOOL_DIR)."""
    folder = tmp_path / "spool"
    monkeypatch.setenv("DICOMFLOW_SPOOL_DIR", str(folder))
    return folder


@pytest.fixture
def pipeline(tmp_path: Path, nats_server: NatsServer, spool_dir: Path) -> Iterator[Pipeline]:
    p = _pipeline(tmp_path, nats_server, {"max_dataset_bytes": LIMIT}).start()
    yield p
    p.stop()


def _associate(pipeline: Pipeline) -> Association:
    ae = AE(ae_title="STORESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(Verification)
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", pipeline.port, ae_title=pipeline.ae_title)
    assert assoc.is_established
    return assoc


def _store_pdus(assoc: Association, made: Made) -> list[P_DATA]:
    """The P-DATA-TF PDUs of a C-STORE-RQ of ``made``, one fragment of PDU bytes each."""
    context = next(cx for cx in assoc.accepted_contexts if cx.abstract_syntax == made.sop_class_uid)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = made.sop_class_uid
    req.AffectedSOPInstanceUID = made.sop_instance_uid
    req.Priority = 2
    req.DataSet = BytesIO(dataset_bytes(made.path))
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    return list(message.encode_msg(context.context_id, PDU))


def _files(folder: Path) -> dict[Path, int]:
    """The spooled dataset files anywhere under ``folder``, and their sizes."""
    sizes = {}
    for path in folder.rglob("*.dcm"):
        try:
            sizes[path] = path.stat().st_size
        except FileNotFoundError:
            continue
    return sizes


def _wait_for(what: str, check: object, timeout: float = SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _response_status(assoc: Association) -> int:
    """Take the C-STORE-RSP off the association, as send_c_store does."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert rsp is not None, "no C-STORE response"
    return int(rsp.Status)


@pytest.mark.parametrize("how", ["abort", "drop"])
def test_a_transfer_cut_off_half_way_leaves_nothing_in_the_spool(
    tmp_path: Path, pipeline: Pipeline, spool_dir: Path, how: str
) -> None:
    made = with_pixel_bytes(tmp_path / "half.dcm", LIMIT // 2)
    assoc = _associate(pipeline)
    pdus = _store_pdus(assoc, made)
    for pdu in pdus[: len(pdus) // 2]:
        assoc.dul.send_pdu(pdu)
    _wait_for("the gateway spooled part of the dataset", lambda: any(_files(spool_dir).values()))
    if how == "abort":
        assoc.abort()
    else:  # the connection drops: no A-ABORT, no A-RELEASE
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        sock.shutdown(socket.SHUT_RDWR)
        _wait_for("the sender noticed", lambda: not assoc.is_alive())
        sock.close()  # pynetdicom leaves a socket it did not close itself open
    _wait_for(
        f"the partial dataset is removed once the association ends ({how})",
        lambda: not _files(spool_dir),
    )
    assert "removed 1 spool file(s) of an association that ended" in pipeline.logs("scp-gateway")
    again = _associate(pipeline)  # the gateway still serves
    assert again.send_c_store(dcmread(made.path)).Status == 0x0000
    again.release()
    assert set(pipeline.wait_stored(1)) == {made.sop_instance_uid}
    _wait_for("nothing spooled after the release", lambda: not _files(spool_dir))


def test_a_dataset_over_the_limit_stops_being_written_while_it_arrives(
    tmp_path: Path, pipeline: Pipeline, spool_dir: Path
) -> None:
    big = with_pixel_bytes(tmp_path / "big.dcm", 4 * LIMIT)
    small = with_pixel_bytes(tmp_path / "small.dcm", 1024, seed=1)
    assoc = _associate(pipeline)
    try:
        pdus = _store_pdus(assoc, big)
        largest = 0
        for pdu in pdus[:-1]:
            assoc.dul.send_pdu(pdu)
            time.sleep(0.005)
            largest = max([largest, *_files(spool_dir).values()])
        # All but the last fragment sent: the file is gone, and was never over the limit.
        time.sleep(0.2)
        assert _files(spool_dir) == {}
        assert 0 < largest <= LIMIT, largest
        assoc.dul.send_pdu(pdus[-1])
        assert _response_status(assoc) == 0xC211
        # The association goes on: the next dataset is received and stored.
        assert assoc.send_c_store(dcmread(small.path)).Status == 0x0000
    finally:
        assoc.release()
    assert set(pipeline.wait_stored(1)) == {small.sop_instance_uid}
    pipeline.wait_drained()
    assert set(pipeline.records()) == {small.sop_instance_uid}
    logs = pipeline.logs("scp-gateway")
    assert f"passed scp.max_dataset_bytes ({LIMIT} bytes) while being received" in logs
    # The refusal names the size of the whole dataset, counted past the file it stopped.
    [received] = re.findall(r"dataset of (\d+) bytes exceeds scp.max_dataset_bytes", logs)
    assert int(received) > 4 * LIMIT


def test_a_dataset_that_travels_inline_is_never_written_to_disk(
    tmp_path: Path, pipeline: Pipeline, spool_dir: Path
) -> None:
    made = with_pixel_bytes(tmp_path / "inline.dcm", INLINE)
    assoc = _associate(pipeline)
    try:
        pdus = _store_pdus(assoc, made)
        assert len(pdus) > 4
        seen: dict[Path, int] = {}
        for pdu in pdus[:-1]:
            assoc.dul.send_pdu(pdu)
            time.sleep(0.005)
            seen.update(_files(spool_dir))
        time.sleep(0.2)  # all but the last fragment have arrived
        seen.update(_files(spool_dir))
        assoc.dul.send_pdu(pdus[-1])
        assert _response_status(assoc) == 0x0000
    finally:
        assoc.release()
    assert seen == {}, "an inline-sized dataset was written to the spool"
    assert set(pipeline.wait_stored(1)) == {made.sop_instance_uid}


def _spool_of(pipeline: Pipeline) -> Path:
    logs = pipeline.logs("scp-gateway")
    marker = "received datasets are spooled in "
    assert marker in logs, logs[-2000:]
    return Path(logs.split(marker, 1)[1].split('"', 1)[0].split("\\n", 1)[0].strip())


def test_the_default_spool_is_a_private_folder_not_the_system_temp_folder(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DICOMFLOW_SPOOL_DIR", raising=False)
    p = _pipeline(tmp_path, nats_server).start()
    try:
        folder = _spool_of(p)
        info = folder.stat()
        assert folder.parent == Path(tempfile.gettempdir()) != folder
        assert stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.geteuid()
        made = with_pixel_bytes(tmp_path / "half.dcm", LIMIT // 2)
        assoc = _associate(p)
        pdus = _store_pdus(assoc, made)
        for pdu in pdus[: len(pdus) // 2]:
            assoc.dul.send_pdu(pdu)
        _wait_for("the dataset is spooled in the private folder", lambda: _files(folder))
        [partial] = _files(folder)
        assert partial.parent == folder and stat.S_IMODE(partial.stat().st_mode) == 0o600
        assoc.abort()
    finally:
        p.stop()
    assert not folder.exists()  # removed with what it held when the gateway stopped


def test_scp_spool_dir_is_created_private_and_refused_when_others_can_enter_it(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    data = tmp_path / "data"
    p = _pipeline(tmp_path, nats_server, {"spool_dir": data / "spool"}).start()
    try:
        assert stat.S_IMODE((data / "spool").stat().st_mode) == 0o700
        assert _spool_of(p).parent == data / "spool"
    finally:
        p.stop()
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    p = _pipeline(tmp_path / "again", nats_server, {"spool_dir": shared})
    with pytest.raises(RuntimeError, match="did not become ready"):
        p.start("scp-gateway", timeout=30)
    assert f"scp.spool_dir {shared} is open to group or others (mode 0755)" in p.logs("scp-gateway")
