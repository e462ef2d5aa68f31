"""Our publish framing is byte for byte nats-py's own, and it is what the client uses."""

from __future__ import annotations

import importlib

import pytest
from dicomflow.shared.patches import natsio
from nats.protocol import command

ORIGINAL = importlib.reload(command)  # nats-py's own functions, even if installed before


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 4099])
@pytest.mark.parametrize("reply", ["", "_INBOX.abc.def"])
def test_frames_are_identical_to_nats_py(payload: bytes, reply: str) -> None:
    hdr = bytearray(b"NATS/1.0\r\nNats-Msg-Id: 1.2.3:ab\r\nDicomflow-Size: 9\r\n\r\n")
    assert natsio.pub_cmd("dicom.ingest.A.B", reply, payload) == ORIGINAL.pub_cmd(
        "dicom.ingest.A.B", reply, payload
    )
    assert natsio.hpub_cmd("dicom.ingest.A.B", reply, hdr, payload) == ORIGINAL.hpub_cmd(
        "dicom.ingest.A.B", reply, hdr, payload
    )


def test_install_replaces_what_the_client_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from nats.aio import client

    monkeypatch.setattr(client, "DEFAULT_BUFFER_SIZE", 32768)
    monkeypatch.setattr(command, "pub_cmd", ORIGINAL.pub_cmd)
    monkeypatch.setattr(command, "hpub_cmd", ORIGINAL.hpub_cmd)
    natsio.install()
    natsio.install()  # idempotent

    assert client.prot_command.hpub_cmd is natsio.hpub_cmd
    assert client.prot_command.pub_cmd is natsio.pub_cmd
    assert client.DEFAULT_BUFFER_SIZE == natsio.READ_BUFFER
