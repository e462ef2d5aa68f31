"""Admission: whether a dataset may enter the pipeline, and the Instance it enters as.

One function, ``admitted``, decides it for the gateway (a C-STORE) and for `dicomflow
import` (a file), in this order:

1. its size is at most ``scp.max_dataset_bytes`` (checked before anything reads it);
2. its identity is readable from a bounded prefix (``identity``): SOP Instance, Study
   and Series UIDs, and, for a C-STORE, the SOP Instance UID equal to the request's;
3. its SHA-256 and size are computed (or taken from the spool, which hashed it as it
   arrived);
4. the Instance it would be published as passes the message contract
   (``messages.parse`` of its headers): nothing is admitted that the encryptor would
   dead-letter.

A refusal raises ``Rejected`` with the DIMSE status the gateway answers and a reason
that names no patient data.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import BinaryIO

from dicomflow.scp_gateway.identity import Identity, Unreadable, read_identity
from dicomflow.shared.contracts import messages
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.errors import ContractViolation

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210
TOO_LARGE = 0xC211

_CHUNK = 1024 * 1024


class Rejected(Exception):
    """The dataset is refused with ``status``; the reason names no patient data."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True, slots=True)
class Arrival:
    """What is known of a dataset besides its bytes: who sent it to whom, and, for a
    C-STORE, what the request said. ``None``: read from the file meta (an import),
    and for ``sop_instance_uid`` not compared."""

    calling_ae: str
    called_ae: str
    sop_class_uid: str | None = None
    transfer_syntax: str | None = None
    sop_instance_uid: str | None = None
    traceparent: str = ""


@contextmanager
def admitted(
    received: int,
    open_body: Callable[[], AbstractContextManager[BinaryIO]],
    arrival: Arrival,
    max_dataset_bytes: int,
    sha256: str | None = None,
) -> Iterator[tuple[Instance, BinaryIO]]:
    """The Instance of the dataset of ``received`` bytes that ``open_body`` opens, and
    the body positioned at its start (open while the ``with`` lasts); raises Rejected.
    ``sha256``: the body's, computed as it was received (None: read it here)."""
    check_size(received, max_dataset_bytes)
    with open_body() as fp:
        identity = identify(fp, arrival.sop_instance_uid)
        size = received
        if sha256 is None:
            size, sha256 = digest(fp)
        instance = Instance(
            sop_class_uid=_given(arrival.sop_class_uid, identity.sop_class_uid),
            sop_instance_uid=identity.sop_instance_uid,
            study_uid=identity.study_uid,
            series_uid=identity.series_uid,
            modality=identity.modality,
            calling_ae=arrival.calling_ae,
            called_ae=arrival.called_ae,
            transfer_syntax=_given(arrival.transfer_syntax, identity.transfer_syntax),
            size=size,
            sha256=sha256,
            traceparent=arrival.traceparent,
        )
        check_contract(instance)
        fp.seek(0)
        yield instance, fp


def _given(value: str | None, from_file: str) -> str:
    return from_file if value is None else value


def check_size(size: int, limit: int) -> None:
    """Refuse a dataset larger than ``limit`` bytes (``scp.max_dataset_bytes``)."""
    if size > limit:
        raise Rejected(
            TOO_LARGE,
            f"dataset of {size} bytes exceeds scp.max_dataset_bytes ({limit} bytes)",
        )


def identify(fp: BinaryIO, affected_sop_instance_uid: str | None) -> Identity:
    """Read and check the identity we need; raise Rejected with the status to answer.
    ``affected_sop_instance_uid``: the C-STORE request's, which the dataset's must equal
    (None: nothing to compare, an imported file)."""
    try:
        identity = read_identity(fp)
    except Unreadable as exc:
        raise Rejected(CANNOT_UNDERSTAND, str(exc)) from exc
    if (
        affected_sop_instance_uid is not None
        and identity.sop_instance_uid != affected_sop_instance_uid
    ):
        raise Rejected(DOES_NOT_MATCH, "dataset SOP Instance UID differs from the request's")
    for name, value in (
        ("SOP Instance UID", identity.sop_instance_uid),
        ("Study Instance UID", identity.study_uid),
        ("Series Instance UID", identity.series_uid),
    ):
        if not _is_uid(value):
            raise Rejected(DOES_NOT_MATCH, f"{name} is missing or not a valid UID")
    return identity


def _is_uid(value: str) -> bool:
    """The message contract's own rule: ``str.isdigit`` would also pass non-ASCII digits."""
    return bool(value) and messages.is_uid(value)


def check_contract(instance: Instance) -> None:
    """Refuse what the encryptor would dead-letter: the headers must parse as sent."""
    try:
        messages.parse(instance.headers())
    except ContractViolation as exc:
        raise Rejected(DOES_NOT_MATCH, f"not publishable: {exc}") from exc


def digest(fp: BinaryIO) -> tuple[int, str]:
    """Size and SHA-256 of ``fp`` from its start, read in chunks."""
    fp.seek(0)
    if isinstance(fp, io.BytesIO):  # in memory already: one call, no chunk copies
        fp.seek(0, io.SEEK_END)
        with fp.getbuffer() as view:
            return len(view), hashlib.sha256(view).hexdigest()
    sha = hashlib.sha256()
    size = 0
    while chunk := fp.read(_CHUNK):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()
