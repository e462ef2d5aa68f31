"""Reading the identity of a received dataset (UIDs, Modality) without its pixel data.

The dataset may be gigabytes, so only a bounded prefix is parsed: elements are read up
to the pixel data, and a deflated dataset is inflated only as far as ``INFLATE_LIMIT``.
pydicom's ``dcmread`` would inflate a deflated file whole, in memory.

The common case (explicit or implicit VR little endian, nothing unusual before the pixel
data) is read by ``identityscan`` from the bytes, several times faster; whatever it is
not sure of is read by pydicom, as before.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

from dicomflow.scp_gateway import identityscan
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_preamble
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

INFLATE_LIMIT = 16 * 1024 * 1024
SCAN_PREFIX = 64 * 1024  # of a file: identity elements come within a few KiB
_READ = 1024 * 1024
_PIXEL_DATA_GROUP = 0x7FE0
_IDENTITY: list[BaseTag | int] = [
    Tag(0x0008, 0x0016),
    Tag(0x0008, 0x0018),
    Tag(0x0008, 0x0060),
    Tag(0x0020, 0x000D),
    Tag(0x0020, 0x000E),
]


# Modality is a CS value: upper-case letters, digits, space, underscore. Anything else
# (a multi-valued or non-conforming value) is dropped: Modality is informational, and
# the message contract refuses other characters.
_MODALITY = re.compile(r"[A-Z0-9_ ]{0,16}")


# What pydicom raises on malformed input, found by tests/unit/test_fuzz_identity.py:
# NotImplementedError for an unknown VR (also in the file meta), RecursionError for
# sequences nested hundreds deep (pydicom recurses once per level), struct.error for a
# file meta element cut short inside its header.
_PARSE_ERRORS = (
    InvalidDicomError,
    ValueError,
    TypeError,
    KeyError,
    EOFError,
    OSError,
    NotImplementedError,
    RecursionError,
    struct.error,
    zlib.error,
)


class Unreadable(Exception):
    """The dataset cannot be parsed."""


@dataclass(frozen=True, slots=True)
class Identity:
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    transfer_syntax: str
    sop_class_uid: str = ""  # the file meta's Media Storage SOP Class UID


def read_identity(fp: BinaryIO) -> Identity:
    """Identity of the Part-10 file ``fp`` (positioned at its start)."""
    scanned = scan_identity(fp)
    if scanned is not None:
        return scanned
    fp.seek(0)
    return parse_identity(fp)


def scan_identity(fp: BinaryIO) -> Identity | None:
    """The identity read by ``identityscan`` (None: pydicom must read it); ``fp`` is
    left anywhere."""
    if isinstance(fp, io.BytesIO):
        buf, whole = fp.getvalue(), True  # the body's own bytes, not a copy
    else:
        buf = fp.read(SCAN_PREFIX)
        whole = len(buf) < SCAN_PREFIX
    found = identityscan.scan(buf, whole)
    if found is None:
        return None
    return Identity(
        sop_instance_uid=found.sop_instance_uid,
        study_uid=found.study_uid,
        series_uid=found.series_uid,
        modality=_modality(found.modality),
        transfer_syntax=found.transfer_syntax,
        sop_class_uid=found.sop_class_uid,
    )


def parse_identity(fp: BinaryIO) -> Identity:
    """Identity of the Part-10 file ``fp`` (positioned at its start), read by pydicom."""
    syntax, sop_class = _read_meta(fp)
    try:
        if syntax == DeflatedExplicitVRLittleEndian:
            fp = _inflated_prefix(fp)
        implicit = syntax == ImplicitVRLittleEndian
        little = syntax != "1.2.840.10008.1.2.2"
        ds: Dataset = read_dataset(
            fp, implicit, little, stop_when=_at_pixels, specific_tags=_IDENTITY
        )
        return Identity(
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            study_uid=str(ds.get("StudyInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            modality=_modality(ds.get("Modality", "")),
            transfer_syntax=str(syntax),
            sop_class_uid=sop_class,
        )
    except _PARSE_ERRORS as exc:
        raise Unreadable(f"dataset cannot be parsed ({type(exc).__name__})") from exc


def _modality(value: object) -> str:
    text = str(value or "").strip().upper()[:16]
    return text if _MODALITY.fullmatch(text) else ""


def _read_meta(fp: BinaryIO) -> tuple[UID, str]:
    """Skip the preamble, read the file meta group; its transfer syntax and Media
    Storage SOP Class UID."""
    try:
        read_preamble(fp, False)
        meta = read_dataset(fp, False, True, stop_when=_after_meta)
        # Values are decoded on access: a malformed element fails here, not above.
        syntax = UID(str(meta.get("TransferSyntaxUID", "")))
    except _PARSE_ERRORS as exc:
        raise Unreadable(f"file meta cannot be parsed ({type(exc).__name__})") from exc
    if not syntax:
        raise Unreadable("no transfer syntax in the file meta")
    try:  # only an import reads it (a C-STORE names its SOP class): never refused here
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
    except _PARSE_ERRORS:
        sop_class = ""
    return syntax, sop_class


def _after_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag.group != 0x0002)


def _at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag.group >= _PIXEL_DATA_GROUP)


def _inflated_prefix(fp: BinaryIO) -> BinaryIO:
    """At most INFLATE_LIMIT inflated bytes, produced a chunk at a time."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = io.BytesIO()
    pending = b""
    while out.tell() < INFLATE_LIMIT:
        if not pending:
            pending = fp.read(_READ)
            if not pending:
                break
        out.write(inflater.decompress(pending, min(_READ, INFLATE_LIMIT - out.tell())))
        pending = inflater.unconsumed_tail
    out.seek(0)
    return out
