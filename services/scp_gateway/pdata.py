"""The data phase of a C-STORE received past pynetdicom's queues: read, spooled, answered.

pynetdicom's DUL thread reads every PDU with two blocking reads (its header, then the rest
in 4 KiB ``recv`` calls), decodes it into PDU and primitive objects, and passes it through
two queues and its state machine before its DIMSE provider appends each fragment to the
dataset's file; the response is encoded with pydicom by the association thread and handed
back to the DUL thread through another queue and a wake-up. For a 0.5 MiB image in 16 KiB
PDUs that is some 32 trips, under the GIL.

``install`` gives one plain-TCP association's DUL (at connection open) a reader that, once
the association is established (Sta6), reads the socket in large reads into a buffer of
its own and takes the P-DATA-TF PDUs of a C-STORE request itself: it decodes the command
set (a C-STORE-RQ with a data set: affected SOP class and instance, message ID, priority,
nothing else), opens the dataset's file through pynetdicom's own factory (the gateway's
spool, which counts, hashes and bounds it as bytes arrive), writes the Part-10 preamble
and meta group pynetdicom writes, then appends each fragment to it. When the last fragment
is there it queues the same ``C_STORE`` primitive pynetdicom would have queued for its
association thread, which serves it (the handler, the status table, Success only after the
publish). That thread's C-STORE response is encoded here and written to the socket
directly (``send_msg``).

Everything else stays pynetdicom's: negotiation, release, abort, ARTIM, every PDU before
Sta6 or after it, every other DIMSE message (C-ECHO, ...), a command fragmented or with an
element this does not know, a message pynetdicom has begun, any PDU over
``scp.maximum_pdu_size`` (refused by ``ConnectionLimits``), and any association with a
handler bound to a data, PDU or DIMSE event. Those PDUs go to pynetdicom's own read, served
first from the reader's buffer. A request broken mid-way (a command fragment inside its
data set, a fragment of another context, an item cut short) aborts the association (the
spool removes its file as it ends). TLS associations keep pynetdicom's path.

It relies on DUL internals (``_read_pdu_data``, ``_is_transport_event``, its state machine
and event queue) and the DIMSE provider's (``message``, ``msg_queue``, ``send_msg``) of
the pynetdicom it was verified on (``FENCE``); elsewhere ``install`` does nothing.

PDU layout (PS3.8 9.3.5): type 0x04, a reserved byte, the length (u32 big-endian), then
presentation data value items: length (u32 big-endian), context ID, message control header
(bit 0: command; bit 1: last fragment), the fragment.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from dicomflow.shared import patches
from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _handlers,
    dimse_messages,
    evt,
)
from pynetdicom.dimse_primitives import C_STORE

log = logging.getLogger(__name__)

FENCE = patches.SCP_PDATA  # the version gate of this module's patch
READ_BYTES = 256 * 1024  # the reader's buffer, and the most one recv asks for
OTHER = -1  # a PDU pynetdicom reads
P_DATA_TF = 0x04
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
NO_DATA_SET = 0x0101
_PDU = struct.Struct(">BBI")  # type, reserved, length
_ITEM = struct.Struct(">IBB")  # item length, context ID, control header
_ELEMENT = struct.Struct("<HHI")  # command sets: implicit VR little endian
US, UL = struct.Struct("<H"), struct.Struct("<I")
_HOOKS = (
    evt.EVT_DATA_RECV,
    evt.EVT_PDU_RECV,
    evt.EVT_DIMSE_RECV,
    evt.EVT_DATA_SENT,
    evt.EVT_PDU_SENT,
    evt.EVT_DIMSE_SENT,
)
_DUL_INTERNALS = ("_read_pdu_data", "_is_transport_event", "state_machine", "event_queue")
_DIMSE_INTERNALS = ("message", "msg_queue", "send_msg")
# The C-STORE-RQ command set (PS3.7 9.3.1.1) taken here: element -> "us" or "uid".
_REQUIRED = {0x0000: "ul", 0x0002: "uid", 0x0100: "us", 0x0110: "us", 0x0700: "us"}
_REQUIRED |= {0x0800: "us", 0x1000: "uid"}


def install(assoc: Any, limit: int) -> bool:
    """Take ``assoc``'s C-STORE data phase here (called at EVT_CONN_OPEN, before its DUL
    reads); ``limit`` is the longest PDU read whole (``ConnectionLimits``). False, and
    nothing changed, on a pynetdicom not verified, a TLS or missing socket, missing
    internals or a handler bound to a data, PDU or DIMSE event."""
    dul: Any = getattr(assoc, "dul", None)
    dimse: Any = getattr(assoc, "dimse", None)
    assoc_socket: Any = getattr(dul, "socket", None)
    sock = getattr(assoc_socket, "socket", None)
    if (
        not FENCE.active
        or not isinstance(sock, socket.socket)
        or isinstance(sock, ssl.SSLSocket)
        or not all(hasattr(dul, name) for name in _DUL_INTERNALS)
        or not all(hasattr(dimse, name) for name in _DIMSE_INTERNALS)
        or not hasattr(assoc, "_accepted_cx")
        or _hooked(assoc)
    ):
        return False
    reader = Reader(assoc, sock, limit)
    setattr(dul, "_read_pdu_data", reader.read_pdu_data)  # noqa: B010 (one instance)
    setattr(dul, "_is_transport_event", reader.is_transport_event)  # noqa: B010
    setattr(assoc_socket, "recv", reader.recv)  # noqa: B010
    setattr(dimse, "send_msg", reader.send_msg)  # noqa: B010
    return True


def _hooked(assoc: Any) -> bool:
    """Whether a handler other than pynetdicom's own debug loggers (bound to every
    association; they log at DEBUG, and not for what is taken here) is bound to an
    event this path does not trigger."""
    return any(
        getattr(handler, "__module__", None) != _handlers.__name__
        for event in _HOOKS
        for handler, _ in assoc.get_handlers(event)
    )


@dataclass(slots=True)
class _Store:
    """A C-STORE request being received: its context, primitive and dataset file."""

    context_id: int
    primitive: C_STORE
    file: Any


class Reader:
    """One association's reads (DUL thread) and C-STORE responses (association thread)."""

    def __init__(self, assoc: Any, sock: socket.socket, limit: int) -> None:
        self._assoc = assoc
        self._dul = assoc.dul
        self._dimse = assoc.dimse
        self._sock = sock
        self._limit = limit
        self._buffer = bytearray(READ_BYTES)
        self._start = self._end = 0  # the unread bytes are _buffer[_start:_end]
        self._read_below = assoc.dul.socket.recv  # pynetdicom's (bounded) recv
        self._pynetdicom_read = assoc.dul._read_pdu_data
        self._pynetdicom_event = assoc.dul._is_transport_event
        self._pynetdicom_send = assoc.dimse.send_msg
        self._message: _Store | None = None
        self._stopped = False  # a broken request aborts the association: read no further

    # -- reads, on the DUL thread --------------------------------------------------------

    def recv(self, nr_bytes: int) -> bytearray:
        """pynetdicom's ``AssociationSocket.recv``: the buffered bytes first."""
        held = self._end - self._start
        if not held or nr_bytes > self._limit:  # the bounded recv refuses the latter
            data: bytearray = self._read_below(nr_bytes)
            return data
        take = min(nr_bytes, held)
        out = bytearray(self._buffer[self._start : self._start + take])
        self._start += take
        if take < nr_bytes:
            out += self._read_below(nr_bytes - take)
        return out

    def is_transport_event(self) -> bool:
        """pynetdicom's check for incoming data, which cannot see the buffered bytes."""
        if self._end > self._start:
            self.read_pdu_data()
            return True
        result: bool = self._pynetdicom_event()
        return result

    def read_pdu_data(self) -> None:
        """Read the next PDU: a P-DATA-TF of a C-STORE request here (and every complete
        one buffered after it), anything else by pynetdicom."""
        if (
            self._stopped
            or self._dul.state_machine.current_state != "Sta6"
            or not self._assoc.is_established
        ):
            self._to_pynetdicom()
            return
        wait = True
        while True:
            try:
                length = self._complete_pdu(wait)
            except OSError:
                log.error("connection closed before the entire PDU was received")
                self._discard()
                self._dul.event_queue.put("Evt17")  # as pynetdicom's read: transport closed
                return
            if length is None:
                return  # a partial PDU: select wakes the DUL when the rest arrives
            if length == OTHER or not self._take(length):
                self._to_pynetdicom()
                return
            if self._stopped:
                return
            wait = False

    def _complete_pdu(self, wait: bool) -> int | None:
        """The length of the P-DATA-TF PDU at the buffer's start, made complete there
        (reading when ``wait``); ``OTHER``: another PDU type, one too long, or the end of
        the stream (pynetdicom reads those); None: not complete, and not ``wait``."""
        if not self._fill(_PDU.size, wait):
            return OTHER if wait else None
        pdu_type, _, length = _PDU.unpack_from(self._buffer, self._start)
        if pdu_type != P_DATA_TF or length > self._limit:
            return OTHER
        if not self._fill(_PDU.size + length, wait):
            return OTHER if wait else None
        return int(length)

    def _fill(self, size: int, wait: bool) -> bool:
        """Whether ``size`` bytes are buffered, reading (``wait``) until they are; False
        at the end of the stream."""
        while self._end - self._start < size:
            if not wait:
                return False
            if self._start + size > len(self._buffer):
                held = self._buffer[self._start : self._end]
                if size > len(self._buffer):
                    self._buffer = bytearray(size)
                self._buffer[: len(held)] = held
                self._start, self._end = 0, len(held)
            view = memoryview(self._buffer)[self._end :]
            read = self._sock.recv_into(view, min(len(view), READ_BYTES))
            if not read:
                return False
            self._end += read
        return True

    def _to_pynetdicom(self) -> None:
        self._discard()
        self._pynetdicom_read()

    def _take(self, length: int) -> bool:
        """Take the complete P-DATA-TF of ``length`` at the buffer's start into the
        C-STORE being received (or start one); False, nothing consumed, when it is not
        one of ours."""
        base = self._start + _PDU.size
        items = _items(self._buffer, base, base + length)
        if self._message is None:
            if items is None or not self._begin(items):
                return False
        elif items is None or not self._append(items):
            self._broken()
        self._start += _PDU.size + length
        if self._start == self._end:
            self._start = self._end = 0
        return True

    def _begin(self, items: list[tuple[int, int, int, int]]) -> bool:
        """A C-STORE request whose command set is the first item, whole."""
        context_id, control, start, end = items[0]
        if (
            control & 0x03 != 0x03
            or self._dimse.message is not None
            or context_id not in self._assoc._accepted_cx
            or any(cx != context_id or ctl & 0x01 for cx, ctl, _, _ in items[1:])
            or _hooked(self._assoc)
        ):
            return False
        command = _command(memoryview(self._buffer)[start:end])
        if command is None:
            return False
        primitive = C_STORE()
        try:
            primitive.MessageID = command[0x0110]
            primitive.AffectedSOPClassUID = command[0x0002]
            primitive.AffectedSOPInstanceUID = command[0x1000]
            primitive.Priority = command[0x0700]
        except (TypeError, ValueError):  # a value pynetdicom would refuse: let it say so
            return False
        context = self._assoc._accepted_cx[context_id]
        factory = getattr(dimse_messages, "NamedTemporaryFile")  # noqa: B009 (the spool's)
        file = factory(delete=False, mode="wb", suffix=".dcm")
        file.write(
            part10_head(str(command[0x0002]), str(command[0x1000]), str(context.transfer_syntax[0]))
        )
        primitive.DataSet = BytesIO()
        internals: Any = primitive  # as pynetdicom's message_to_primitive sets them
        internals._context_id = context_id
        internals._dataset_path = Path(file.name)
        internals._dataset_file = file
        self._message = _Store(context_id, primitive, file)
        if len(items) > 1 and not self._append(items[1:]):
            self._broken()
        return True

    def _append(self, items: list[tuple[int, int, int, int]]) -> bool:
        """The data set fragments of the request being received; False when one is not
        (the request is broken)."""
        message = self._message
        if message is None:
            return False
        for index, (context_id, control, start, end) in enumerate(items):
            if context_id != message.context_id or control & 0x01:
                return False
            message.file.write(bytes(self._buffer[start:end]))
            if control & 0x02:
                if index != len(items) - 1:
                    return False  # items after the last fragment
                self._message = None
                message.file.flush()  # the handler reads it by name
                self._dimse.msg_queue.put((message.context_id, message.primitive))
        return True

    def _broken(self) -> None:
        """A request cut off or mixed with another: its file removed, the association
        aborted (Evt19, as pynetdicom does for a DIMSE message it cannot decode)."""
        log.error("a C-STORE request's P-DATA broke off mid-message: aborting the association")
        self._discard()
        self._stopped = True
        self._dul.event_queue.put("Evt19")

    def _discard(self) -> None:
        """The request being received, if any, dropped. Its file is the spool's, made in
        this association's DUL thread: removed (and logged) when the association ends,
        which a request cut off always leads to, as with pynetdicom's own path."""
        self._message = None

    # -- responses, on the association thread --------------------------------------------

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """pynetdicom's ``DIMSEServiceProvider.send_msg``, with a plain C-STORE response
        (no error comment, no offending element) encoded and written here."""
        if (
            not isinstance(primitive, C_STORE)
            or primitive.MessageIDBeingRespondedTo is None
            or primitive.ErrorComment is not None
            or primitive.OffendingElement is not None
            or primitive.AffectedSOPClassUID is None
            or primitive.AffectedSOPInstanceUID is None
            or primitive.Status is None
            or self._dul.state_machine.current_state != "Sta6"
            or _hooked(self._assoc)
        ):
            self._pynetdicom_send(primitive, context_id)
            return
        command = response_command(
            str(primitive.AffectedSOPClassUID),
            int(primitive.MessageIDBeingRespondedTo),
            int(primitive.Status),
            str(primitive.AffectedSOPInstanceUID),
        )
        item = _ITEM.pack(len(command) + 2, context_id, 0x03) + command
        try:
            self._sock.sendall(_PDU.pack(P_DATA_TF, 0, len(item)) + item)
        except OSError:
            self._dul.event_queue.put("Evt17")  # as pynetdicom's send: transport closed


def _items(buffer: bytearray, start: int, end: int) -> list[tuple[int, int, int, int]] | None:
    """The PDV items of a P-DATA-TF body: (context ID, control, fragment start, end);
    None when one is cut short, or there is none."""
    items = []
    pos = start
    while pos < end:
        if pos + _ITEM.size > end:
            return None
        length, context_id, control = _ITEM.unpack_from(buffer, pos)
        if length < 2 or pos + 4 + length > end:
            return None
        items.append((context_id, control, pos + _ITEM.size, pos + 4 + length))
        pos += 4 + length
    return items or None


def _command(data: memoryview) -> dict[int, Any] | None:
    """The elements of a C-STORE-RQ command set with a data set, or None for any other
    (another message, another element, repeated, cut short, an odd length)."""
    found: dict[int, Any] = {}  # int (US, UL) or str (UI)
    pos, end = 0, len(data)
    while pos < end:
        if pos + _ELEMENT.size > end:
            return None
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += _ELEMENT.size
        kind = _REQUIRED.get(element)
        if group != 0 or kind is None or element in found or pos + length > end:
            return None
        value = data[pos : pos + length]
        pos += length
        if kind == "uid":
            try:
                found[element] = bytes(value).rstrip(b"\x00 ").decode("ascii")
            except UnicodeDecodeError:
                return None
        elif length == (UL.size if kind == "ul" else US.size):
            found[element] = (UL if kind == "ul" else US).unpack(value)[0]
        else:
            return None
    if len(found) != len(_REQUIRED) or found[0x0100] != C_STORE_RQ:
        return None
    if found[0x0800] == NO_DATA_SET:
        return None
    return found


def _element(element: int, value: bytes, group: int = 0x0000, explicit: bytes = b"") -> bytes:
    if explicit:  # explicit VR little endian (the file meta group)
        if explicit == b"OB":
            return struct.pack("<HH2sHI", group, element, explicit, 0, len(value)) + value
        return struct.pack("<HH2sH", group, element, explicit, len(value)) + value
    return _ELEMENT.pack(group, element, len(value)) + value


def _pad(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def response_command(sop_class: str, message_id: int, status: int, sop_instance: str) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2) as pynetdicom encodes it (the unit
    tests compare the two)."""
    body = b"".join(
        (
            _element(0x0002, _pad(sop_class, b"\x00")),
            _element(0x0100, US.pack(C_STORE_RSP)),
            _element(0x0120, US.pack(message_id)),
            _element(0x0800, US.pack(NO_DATA_SET)),
            _element(0x0900, US.pack(status)),
            _element(0x1000, _pad(sop_instance, b"\x00")),
        )
    )
    return _element(0x0000, UL.pack(len(body))) + body


def part10_head(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """The preamble, prefix and file meta group pynetdicom writes before a received data
    set (``create_file_meta`` + ``write_file_meta_info``; the unit tests compare them)."""
    body = b"".join(
        (
            _element(0x0001, b"\x00\x01", 0x0002, b"OB"),
            _element(0x0002, _pad(sop_class, b"\x00"), 0x0002, b"UI"),
            _element(0x0003, _pad(sop_instance, b"\x00"), 0x0002, b"UI"),
            _element(0x0010, _pad(transfer_syntax, b"\x00"), 0x0002, b"UI"),
            _element(0x0012, _pad(PYNETDICOM_IMPLEMENTATION_UID, b"\x00"), 0x0002, b"UI"),
            _element(0x0013, _pad(PYNETDICOM_IMPLEMENTATION_VERSION, b" "), 0x0002, b"SH"),
        )
    )
    group_length = _element(0x0000, UL.pack(len(body)), 0x0002, b"UL")
    return b"\x00" * 128 + b"DICM" + group_length + body
