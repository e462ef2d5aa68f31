"""The identity read straight from the bytes of a Part-10 file, without pydicom.

Only the common case: explicit or implicit VR little endian, every element of the file
meta and of the dataset up to the pixel data of defined length and of a known VR, and
single-valued identity values of the VR the dictionary gives them. Anything else (big
endian, deflate, an undefined length, an unknown VR, a value cut short, a backslash, an
empty UID ...) answers None and ``identity`` reads the file with pydicom: this reader
never decides differently from pydicom, it only decides sooner
(tests/unit/test_fuzz_identity.py compares the two on fuzzed input).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.filereader import ENCODED_VR
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

IMPLICIT_LITTLE = "1.2.840.10008.1.2"
_NOT_HERE = frozenset({"1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})  # big, deflated
_KNOWN_VR = frozenset(vr for vr in ENCODED_VR if len(vr) == 2)
_LONG_VR = frozenset(str(vr).encode() for vr in EXPLICIT_VR_LENGTH_32)
_UNDEFINED = 0xFFFFFFFF
_PIXEL_GROUP = 0x7FE0

MEDIA_SOP_CLASS = 0x00020002
TRANSFER_SYNTAX = 0x00020010
SOP_INSTANCE = 0x00080018
MODALITY = 0x00080060
STUDY = 0x0020000D
SERIES = 0x0020000E
_META_VR = {MEDIA_SOP_CLASS: b"UI", TRANSFER_SYNTAX: b"UI"}
_DATASET_VR = {SOP_INSTANCE: b"UI", MODALITY: b"CS", STUDY: b"UI", SERIES: b"UI"}

_tag_and_short = struct.Struct("<HH2sH").unpack_from
_implicit = struct.Struct("<HHL").unpack_from
_long = struct.Struct("<L").unpack_from


@dataclass(frozen=True, slots=True)
class Scanned:
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str  # as pydicom decodes it, before identity's own clean-up


def scan(buf: bytes, whole: bool) -> Scanned | None:
    """The identity in ``buf``, the start of a Part-10 file (all of it when ``whole``),
    or None when pydicom must read it."""
    if len(buf) < 132 or buf[128:132] != b"DICM":
        return None
    walked = _walk(buf, 132, False, True, _META_VR, whole)
    if walked is None:
        return None
    meta, pos = walked
    syntax = _uid(meta.get(TRANSFER_SYNTAX))
    sop_class = _uid(meta.get(MEDIA_SOP_CLASS, b""))
    if not syntax or sop_class is None or syntax in _NOT_HERE:
        return None
    walked = _walk(buf, pos, syntax == IMPLICIT_LITTLE, False, _DATASET_VR, whole)
    if walked is None:
        return None
    found = walked[0]
    sop, study, series = (_uid(found.get(tag)) for tag in (SOP_INSTANCE, STUDY, SERIES))
    modality = _text(found.get(MODALITY, b""))
    if modality is None or not sop or not study or not series:
        return None
    return Scanned(syntax, sop_class, sop, study, series, modality)


def _text(value: bytes | None) -> str | None:
    """A single value as pydicom decodes it (latin-1, trailing spaces and NULs cut);
    None when absent or multi-valued."""
    if value is None:
        return None
    text = value.decode("latin-1").rstrip("\0 ")
    return None if "\\" in text else text


def _uid(value: bytes | None) -> str | None:
    """A single UID as pydicom decodes it; None (pydicom reads the file) when pydicom's
    ``UID`` would change it further: it strips whitespace at both ends (fuzzing found a
    value with a leading space that the scan kept and pydicom did not)."""
    text = _text(value)
    if text is None or text != text.strip():
        return None
    return text


def _walk(
    buf: bytes,
    pos: int,
    implicit: bool,
    meta: bool,
    wanted: dict[int, bytes],
    whole: bool,
) -> tuple[dict[int, bytes], int] | None:
    """The values of ``wanted`` tags from ``pos`` to the end of the file meta (``meta``)
    or to the pixel data, and where that end is; None at anything unusual."""
    end = len(buf)
    if end - pos >= 6:  # pydicom's check of the first element's encoding
        looks_explicit = 0x40 < buf[pos + 4] < 0x5B and 0x40 < buf[pos + 5] < 0x5B
        if looks_explicit == implicit:
            return None
    found: dict[int, bytes] = {}
    while True:
        if end - pos < 8:
            return (found, pos) if whole and (pos == end or not meta) else None
        if implicit:
            group, element, length = _implicit(buf, pos)
            vr = b""
            head = 8
        else:
            group, element, vr, length = _tag_and_short(buf, pos)
            if vr not in _KNOWN_VR:  # pydicom reads it some other way, then stops or not
                if meta and group not in (2, 0xFFFE):
                    return found, pos
                return (found, pos) if not meta and group >= _PIXEL_GROUP else None
            head = 8
            if vr in _LONG_VR:
                if end - pos < 12:
                    return None
                (length,) = _long(buf, pos + 8)
                head = 12
        if meta and group != 2:
            return None if group == 0xFFFE else (found, pos)
        if not meta and group >= _PIXEL_GROUP:
            return found, pos
        if length == _UNDEFINED or pos + head + length > end:
            return None
        tag = group << 16 | element
        if tag in wanted:
            if vr and vr != wanted[tag]:
                return None
            found[tag] = buf[pos + head : pos + head + length]
        pos += head + length
