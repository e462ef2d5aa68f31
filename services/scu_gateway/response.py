"""C-STORE responses decoded without pydicom, on the path from one C-STORE to the next.

pynetdicom's DUL thread turns every P-DATA it receives into a DIMSE primitive through
pydicom's dataset reader and a setter per element: about 0.5 ms for a C-STORE-RSP of six
elements, CPU spent between the peer's answer and the sender's next request, once per
instance. ``install`` gives one association's DIMSE provider a ``receive_primitive``
that decodes the common response itself: a whole command set in one fragment, the
elements a C-STORE-RSP always has (PS3.7 9.3.1.2) and nothing else, no data set. It
then queues the same ``C_STORE`` primitive pynetdicom would have queued. Everything else
(a response with an error comment or another optional element, a fragmented command, any
other message, a message that follows a partial one, an association with a handler bound
to ``EVT_DIMSE_RECV``) goes to pynetdicom's own method, unchanged.

The element layout is the one ``pdata`` encodes requests with. On a pynetdicom this was
not verified on (``FENCE``, decided when the scu-gateway starts) ``install`` does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dicomflow.scu_gateway.pdata import COMMAND_LAST, ELEMENT, UL, US
from dicomflow.shared import patches
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

FENCE = patches.SCU_RESPONSE  # the version gate of this module's patch
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
_GROUP_LENGTH, _SOP_CLASS, _FIELD, _RESPONDED_TO, _DATA_SET, _STATUS, _SOP_INSTANCE = (
    0x0000,
    0x0002,
    0x0100,
    0x0120,
    0x0800,
    0x0900,
    0x1000,
)
_UIDS = {_SOP_CLASS, _SOP_INSTANCE}
_NUMBERS = {_FIELD, _RESPONDED_TO, _DATA_SET, _STATUS}


def install(assoc: Any) -> None:
    """Decode ``assoc``'s plain C-STORE responses here (a no-op on a pynetdicom not
    verified, or without the internals this relies on: the provider's
    ``receive_primitive``, ``message`` and ``msg_queue``, the association's
    ``get_handlers``)."""
    dimse: Any = getattr(assoc, "dimse", None)
    original: Callable[[Any], None] | None = getattr(dimse, "receive_primitive", None)
    if (
        not FENCE.active
        or original is None
        or not all(hasattr(dimse, name) for name in ("message", "msg_queue"))
        or not hasattr(assoc, "get_handlers")
    ):
        return

    def receive_primitive(primitive: Any) -> None:
        found = None
        if dimse.message is None and not assoc.get_handlers(evt.EVT_DIMSE_RECV):
            found = decode(primitive.presentation_data_value_list)
        if found is None:
            original(primitive)
            return
        context_id, rsp = found
        dimse.msg_queue.put((context_id, rsp))

    setattr(dimse, "receive_primitive", receive_primitive)  # noqa: B010 (one instance)


def decode(values: list[tuple[int, bytes]]) -> tuple[int, C_STORE] | None:
    """The context ID and C-STORE primitive of a plain C-STORE-RSP held whole in one
    presentation data value, or None for anything else."""
    if len(values) != 1:
        return None
    context_id, data = values[0]
    if not data or data[0] & COMMAND_LAST != COMMAND_LAST:
        return None
    found = _elements(memoryview(data)[1:])
    if found is None:
        return None
    numbers, uids = found
    if (
        set(numbers) != {_GROUP_LENGTH, *_NUMBERS}
        or set(uids) != _UIDS
        or numbers[_FIELD] != C_STORE_RSP
        or numbers[_DATA_SET] != NO_DATA_SET
    ):
        return None
    rsp = C_STORE()
    try:
        rsp.MessageIDBeingRespondedTo = numbers[_RESPONDED_TO]
        rsp.AffectedSOPClassUID = uids[_SOP_CLASS]
        rsp.AffectedSOPInstanceUID = uids[_SOP_INSTANCE]
        rsp.Status = numbers[_STATUS]
    except (TypeError, ValueError):  # a value pynetdicom would refuse: let it say so
        return None
    rsp._context_id = context_id  # as pynetdicom's message_to_primitive sets them
    rsp._dataset_path = None
    rsp._dataset_file = None
    return context_id, rsp


def _elements(command: memoryview) -> tuple[dict[int, int], dict[int, str]] | None:
    """The group 0000 elements by element number, numbers (US, the UL group length) and
    UIDs apart; None if any element is unknown, repeated, of an unexpected length or cut
    short."""
    numbers: dict[int, int] = {}
    uids: dict[int, str] = {}
    pos, end = 0, len(command)
    while pos < end:
        if pos + ELEMENT.size > end:
            return None
        group, element, length = ELEMENT.unpack_from(command, pos)
        pos += ELEMENT.size
        if group != 0x0000 or element in numbers or element in uids or pos + length > end:
            return None
        value = command[pos : pos + length]
        pos += length
        if element == _GROUP_LENGTH and length == UL.size:
            numbers[element] = UL.unpack(value)[0]
        elif element in _NUMBERS and length == US.size:
            numbers[element] = US.unpack(value)[0]
        elif element in _UIDS:
            try:
                uids[element] = bytes(value).rstrip(b"\x00 ").decode("ascii")
            except UnicodeDecodeError:
                return None
        else:
            return None
    return numbers, uids
