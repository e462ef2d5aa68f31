"""The scu-gateway's own C-STORE-RQ encoding and file meta reading match pynetdicom's."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from dicomflow.scu_gateway import pdata
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset

from support.dicomfiles import transfer_syntax_set


def pynetdicom_command(sop_class: str, sop_instance: str) -> bytes:
    req = C_STORE()
    req.MessageID = pdata.MESSAGE_ID
    req.Priority = pdata.PRIORITY_LOW
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req._dataset_path = (Path("unused"), 0)  # marks the data set present
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    return bytes(encode(message.command_set, True, True) or b"")


@pytest.mark.parametrize(
    "sop_instance",
    ["1.2.3.4", "1.2.3.45", generate_uid(), "1." + "2" * 62],  # even, odd, 64 characters
)
def test_command_set_is_pynetdicoms_byte_for_byte(sop_instance: str) -> None:
    for sop_class in (str(CTImageStorage), "1.2.840.10008.5.1.4.1.1.7"):
        assert pdata.command_set(sop_class, sop_instance) == pynetdicom_command(
            sop_class, sop_instance
        )


def test_file_meta_agrees_with_split_dataset(tmp_path: Path) -> None:
    files = transfer_syntax_set(tmp_path)
    assert len(files) >= 5
    for f in files:
        meta, offset = split_dataset(f.path)
        ours = pdata.file_meta(f.path)
        assert ours == pdata.FileMeta(
            str(meta.MediaStorageSOPClassUID),
            str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID),
            offset,
        ), f.path


def test_file_meta_falls_back_on_what_it_does_not_read(tmp_path: Path) -> None:
    f = transfer_syntax_set(tmp_path)[0]
    raw = f.path.read_bytes()
    assert pdata._walk_meta(raw[:200]) is None  # meta group cut short
    assert pdata._walk_meta(b"\0" * 128 + b"NOPE" + raw[132:]) is None
    assert pdata.file_meta(f.path).offset == split_dataset(f.path)[1]


class PartialSends:
    """A socket's sendmsg, counting the calls that sent less than they were given."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.partial = 0

    def sendmsg(self, views: list[memoryview]) -> int:
        sent = self.sock.sendmsg(views)
        if sent < sum(len(v) for v in views):
            self.partial += 1
        return sent


def test_send_all_survives_partial_sends() -> None:
    """sendmsg may take part of the buffers: every byte still goes, in order."""
    left, right = socket.socketpair()
    try:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        left.settimeout(10)  # as pdata.store sets it: sendmsg may then send part
        payload = [bytes([i]) * (1000 + i) for i in range(200)]
        received = bytearray()

        def drain() -> None:
            while len(received) < sum(map(len, payload)):
                received.extend(right.recv(7000))

        reader = threading.Thread(target=drain)
        reader.start()
        recording = PartialSends(left)
        pdata._send_all(recording, [memoryview(p) for p in payload])
        reader.join(timeout=10)
        assert bytes(received) == b"".join(payload)
        assert recording.partial > 0  # the path under test was taken
    finally:
        left.close()
        right.close()
