"""C-STORE over a plain TCP association with the request written straight to the socket.

pynetdicom's ``send_c_store`` hands every P-DATA-TF PDU of a request to its DUL thread
through a queue, its state machine and an event, all in Python under the GIL: with the
16 KiB PDUs most peers accept, a 512 KiB image is 32 trips, and its whole dataset is
queued in memory at once. Here the sender thread writes the PDUs itself, reading the
file 1 MiB at a time (memory bounded whatever the instance's size) and handing each
batch's PDUs, headers and slices of the batch, to one ``sendmsg``. It also reads the
file meta group and encodes the C-STORE-RQ command set itself (``file_meta``,
``command_set``): pydicom's reader and encoder cost close to a millisecond a request
under the GIL, on the path between one response and the next request.

Everything else stays pynetdicom's: the association and its negotiation, the
presentation context, the reactor kept out of the way around
the request (``reactors.paused``: held in its sleep, or paused at pynetdicom's own
checkpoint as ``send_c_store`` does it), the response (read by the DUL thread and decoded by its
DIMSE provider) and its checks, the abort after a DIMSE timeout. That relies on
pynetdicom internals (``_reactor_checkpoint``, ``_is_paused``, ``_get_valid_context``,
``_check_received_status``, ``_handle_no_response``), present throughout 3.0.x; it is
used only on the pynetdicom it was verified on (``FENCE``, decided when the scu-gateway
starts) and ``usable`` checks for them.

TLS associations keep ``send_c_store``: an SSL socket must not be written by one thread
while the DUL thread reads it.

PDU layout (PS3.8 9.3.5): type 0x04, a reserved byte, the length (u32 big-endian), then
one presentation data value item: its length (u32 big-endian), the presentation context
ID and the message control header (bit 0: command; bit 1: last fragment).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomflow.shared import patches
from dicomflow.shared.patches import reactors
from pydicom.dataset import Dataset
from pynetdicom.dsutils import split_dataset

FENCE = patches.SCU_PDATA  # the version gate of this module's patch
MESSAGE_ID = 1  # one request at a time per association, as send_c_store's default
PRIORITY_LOW = 2  # send_c_store's default
PDV_OVERHEAD = 6  # item length (4), context ID (1), control header (1)
UNLIMITED_CHUNK = 1024 * 1024  # fragment size when the peer sets no maximum
DATA, DATA_LAST, COMMAND_LAST = 0x00, 0x02, 0x03
_HEADER = struct.Struct(">BBIIBB")
_INTERNALS = ("_reactor_checkpoint", "_get_valid_context", "_check_received_status")


def usable(assoc: Any) -> bool:
    """Whether ``assoc`` is sent through here: a verified pynetdicom (``FENCE``) with the
    internals this module relies on."""
    return (
        FENCE.active
        and all(hasattr(assoc, name) for name in _INTERNALS)
        and hasattr(assoc, "_is_paused")
    )


def store(
    assoc: Any, path: Path, write_timeout: float, written: Callable[[], None] | None = None
) -> Dataset:
    """C-STORE the Part-10 file at ``path``; the response's status elements, or an empty
    Dataset when there was none (DIMSE timeout, abort), like ``send_c_store``.
    ``written`` (which must not raise) is called once the request is on the wire, before
    the response is awaited.

    Raises RuntimeError when the association is not established and OSError when the
    socket fails (the association is then aborted: a request cut short cannot go on).
    """
    if not assoc.is_established:
        raise RuntimeError("the association is not established")
    meta = file_meta(path)
    context = assoc._get_valid_context(
        meta.sop_class_uid, meta.transfer_syntax, "scu", allow_conversion=False
    )
    command = command_set(meta.sop_class_uid, meta.sop_instance_uid)
    limit = int(assoc.dimse.maximum_pdu_size or 0)
    step = limit - PDV_OVERHEAD if limit else UNLIMITED_CHUNK
    if len(command) > step:
        raise RuntimeError("the C-STORE command set does not fit one PDU")
    sock = assoc.dul.socket.socket
    sock.settimeout(write_timeout)
    context_id = int(context.context_id)
    try:
        with reactors.paused(assoc, write_timeout):
            _write(sock, context_id, command, path, meta.offset, step)
            if written is not None:
                written()
            _, rsp = assoc.dimse.get_msg(block=True)
    except OSError:
        assoc.abort()
        raise
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What a C-STORE needs from a Part-10 file's meta group, and where its dataset
    starts."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    offset: int


_META_UIDS = {0x0002: "sop_class_uid", 0x0003: "sop_instance_uid", 0x0010: "transfer_syntax"}
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT"}
META_READ = 4096  # enough for any meta group dicomflow writes or receives


def file_meta(path: Path) -> FileMeta:
    """The meta group of the Part-10 file at ``path``, read by walking its explicit-VR
    little-endian elements (pydicom's reader costs some 0.15 ms an instance under the
    GIL); a file this walk does not understand goes to pynetdicom's ``split_dataset``."""
    with path.open("rb") as file:
        head = file.read(META_READ)
    found = _walk_meta(head)
    if found is not None:
        return found
    meta, offset = split_dataset(path)
    return FileMeta(
        str(meta.MediaStorageSOPClassUID),
        str(meta.MediaStorageSOPInstanceUID),
        str(meta.TransferSyntaxUID),
        offset,
    )


def _walk_meta(head: bytes) -> FileMeta | None:
    if head[128:132] != b"DICM":
        return None
    pos, values = 132, {}
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                return None
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if length == 0xFFFFFFFF or start + length > len(head):
            return None  # undefined length, or a meta group longer than we read
        name = _META_UIDS.get(element)
        if name is not None:
            values[name] = head[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    if len(values) != len(_META_UIDS):
        return None
    return FileMeta(offset=pos, **values)


def command_set(sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """The C-STORE-RQ command set (PS3.7 9.3.1.1), implicit VR little endian, as
    pynetdicom encodes it (the unit tests compare the two): group length, affected SOP
    class, command field 0x0001, message ID, priority, data set type 0x0001 (present),
    affected SOP instance. Built by hand: pydicom's encoder cost some 0.7 ms a request."""
    body = b"".join(
        (
            _element(0x0002, _uid(sop_class_uid)),
            _element(0x0100, US.pack(0x0001)),
            _element(0x0110, US.pack(MESSAGE_ID)),
            _element(0x0700, US.pack(PRIORITY_LOW)),
            _element(0x0800, US.pack(0x0001)),
            _element(0x1000, _uid(sop_instance_uid)),
        )
    )
    return _element(0x0000, UL.pack(len(body))) + body


# A command set is implicit VR little endian: each element is its tag (group, element:
# two u16), its length (u32) and its value; values here are US or UL numbers and UIDs.
US, UL = struct.Struct("<H"), struct.Struct("<I")
ELEMENT = struct.Struct("<HHI")


def _element(element: int, value: bytes) -> bytes:
    return ELEMENT.pack(0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


BATCH_BYTES = 1024 * 1024  # dataset bytes read, and handed to one sendmsg, at a time


def _write(sock: Any, context_id: int, command: bytes, path: Path, offset: int, step: int) -> None:
    """The command, then the dataset from ``offset`` in ``path``, ``step`` bytes a PDU.

    The file is read ``BATCH_BYTES`` at a time into the thread's buffer (memory stays
    bounded) and each batch's PDUs go out in one ``sendmsg``: their headers and slices of
    the batch, no copies."""
    buffers: list[bytes | memoryview] = [_header(context_id, COMMAND_LAST, len(command)), command]
    batch = max(BATCH_BYTES // step, 1) * step
    buffer = _batch_buffer(batch)
    with path.open("rb") as file:
        remaining = os.fstat(file.fileno()).st_size - offset
        file.seek(offset)
        if remaining <= 0:  # a request with an empty dataset still ends with a last fragment
            _send_all(sock, [*buffers, _header(context_id, DATA_LAST, 0)])
            return
        while remaining > 0:
            chunk = buffer[: file.readinto(buffer[: min(batch, remaining)])]
            if not chunk:
                raise OSError(f"{path} shrank while it was being sent")
            remaining -= len(chunk)
            for start in range(0, len(chunk), step):
                fragment = chunk[start : start + step]
                last = remaining <= 0 and start + step >= len(chunk)
                control = DATA_LAST if last else DATA
                buffers += (_header(context_id, control, len(fragment)), fragment)
            _send_all(sock, buffers)
            buffers = []


_local = threading.local()


def _batch_buffer(size: int) -> memoryview:
    """This thread's read buffer of at least ``size`` bytes, reused from one request to
    the next (every batch is sent before the next is read into it): a fresh buffer each
    time is fresh memory, and its page faults cost more than the read."""
    buffer: bytearray | None = getattr(_local, "buffer", None)
    if buffer is None or len(buffer) < size:
        buffer = _local.buffer = bytearray(size)
    return memoryview(buffer)[:size]


IOV_LIMIT = 512  # buffers per sendmsg, below every system's IOV_MAX (1024 on Linux)


def _send_all(sock: Any, buffers: list[bytes | memoryview]) -> None:
    """Send every byte of ``buffers``, in order, however little each sendmsg takes."""
    views = [memoryview(b) for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views[:IOV_LIMIT])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _header(context_id: int, control: int, size: int) -> bytes:
    length = size + 2
    return _HEADER.pack(0x04, 0, length + 4, length, context_id, control)
