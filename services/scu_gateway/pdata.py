"""C-STORE over a plain TCP association with the request written straight to the socket.

pynetdicom's ``send_c_store`` hands every P-DATA-TF PDU of a request to its DUL thread
through a queue, its state machine and an event, all in Python under the GIL: with the
16 KiB PDUs most peers accept, a 512 KiB image is 32 trips, and its whole dataset is
queued in memory at once. Here the sender thread writes the PDUs itself, reading the
file one PDU at a time (memory bounded whatever the instance's size).

Everything else stays pynetdicom's: the association and its negotiation, the
presentation context, the command set's encoding, the reactor kept out of the way around
the request (``reactors.paused``: held in its sleep, or paused at pynetdicom's own
checkpoint as ``send_c_store`` does it), the response (read by the DUL thread and decoded by its
DIMSE provider) and its checks, the abort after a DIMSE timeout. That relies on
pynetdicom internals (``_reactor_checkpoint``, ``_is_paused``, ``_get_valid_context``,
``_check_received_status``, ``_handle_no_response``), present throughout 3.0.x, the
version the lock file pins; ``usable`` checks for them.

TLS associations keep ``send_c_store``: an SSL socket must not be written by one thread
while the DUL thread reads it.

PDU layout (PS3.8 9.3.5): type 0x04, a reserved byte, the length (u32 big-endian), then
one presentation data value item: its length (u32 big-endian), the presentation context
ID and the message control header (bit 0: command; bit 1: last fragment).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset

from dicomflow.shared import reactors

MESSAGE_ID = 1  # one request at a time per association, as send_c_store's default
PRIORITY_LOW = 2  # send_c_store's default
PDV_OVERHEAD = 6  # item length (4), context ID (1), control header (1)
UNLIMITED_CHUNK = 1024 * 1024  # fragment size when the peer sets no maximum
DATA, DATA_LAST, COMMAND_LAST = 0x00, 0x02, 0x03
_HEADER = struct.Struct(">BBIIBB")
_INTERNALS = ("_reactor_checkpoint", "_get_valid_context", "_check_received_status")


def usable(assoc: Any) -> bool:
    """Whether ``assoc`` has the pynetdicom internals this module relies on."""
    return all(hasattr(assoc, name) for name in _INTERNALS) and hasattr(assoc, "_is_paused")


def store(assoc: Any, path: Path, write_timeout: float) -> Dataset:
    """C-STORE the Part-10 file at ``path``; the response's status elements, or an empty
    Dataset when there was none (DIMSE timeout, abort), like ``send_c_store``.

    Raises RuntimeError when the association is not established and OSError when the
    socket fails (the association is then aborted: a request cut short cannot go on).
    """
    if not assoc.is_established:
        raise RuntimeError("the association is not established")
    meta, offset = split_dataset(path)
    context = assoc._get_valid_context(
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID, "scu", allow_conversion=False
    )
    req = C_STORE()
    req.MessageID = MESSAGE_ID
    req.Priority = PRIORITY_LOW
    req.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    req.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    req._dataset_path = (path, offset)  # sets the command's "data set present"
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    command = bytes(encode(message.command_set, True, True) or b"")
    limit = int(assoc.dimse.maximum_pdu_size or 0)
    step = limit - PDV_OVERHEAD if limit else UNLIMITED_CHUNK
    if not command or len(command) > step:
        raise RuntimeError("the C-STORE command set does not fit one PDU")
    sock = assoc.dul.socket.socket
    sock.settimeout(write_timeout)
    context_id = int(context.context_id)
    try:
        with reactors.paused(assoc, write_timeout):
            _write(sock, context_id, command, path, offset, step)
            _, rsp = assoc.dimse.get_msg(block=True)
    except OSError:
        assoc.abort()
        raise
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)  # type: ignore[no-any-return]


def _write(sock: Any, context_id: int, command: bytes, path: Path, offset: int, step: int) -> None:
    """The command, then the dataset from ``offset`` in ``path``, ``step`` bytes a PDU."""
    sock.sendall(_pdu(context_id, COMMAND_LAST, command))
    with path.open("rb") as file:
        remaining = os.fstat(file.fileno()).st_size - offset
        file.seek(offset)
        while True:
            chunk = file.read(min(step, remaining))
            remaining -= len(chunk)
            if remaining > 0 and not chunk:
                raise OSError(f"{path} shrank while it was being sent")
            sock.sendall(_pdu(context_id, DATA if remaining > 0 else DATA_LAST, chunk))
            if remaining <= 0:
                return


def _pdu(context_id: int, control: int, fragment: bytes) -> bytes:
    length = len(fragment) + 2
    return _HEADER.pack(0x04, 0, length + 4, length, context_id, control) + fragment
