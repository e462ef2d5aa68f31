"""The header contract of every message between stages.

Headers carry the DICOM identity and routing facts, never patient demographics. The
body is either the bytes themselves (``Dicomflow-Body: inline``) or, above the inline
limit, a reference to a chunked object in the blob bucket (``Dicomflow-Body: blob``
and ``Dicomflow-Blob: <name>``). ``parse`` validates every header before a stage uses
it; anything off raises ``ContractViolation`` and the message is dead-lettered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import StrEnum

from dicomflow.shared.errors import ContractViolation

SCHEMA_VERSION = "1"

H_SCHEMA = "Dicomflow-Schema"
H_SOP_CLASS = "Dicomflow-Sop-Class-Uid"
H_SOP_INSTANCE = "Dicomflow-Sop-Instance-Uid"
H_STUDY = "Dicomflow-Study-Uid"
H_SERIES = "Dicomflow-Series-Uid"
H_MODALITY = "Dicomflow-Modality"
H_CALLING_AE = "Dicomflow-Calling-Ae"
H_CALLED_AE = "Dicomflow-Called-Ae"
H_TRANSFER_SYNTAX = "Dicomflow-Transfer-Syntax"
H_SIZE = "Dicomflow-Size"
H_SHA256 = "Dicomflow-Sha256"
H_BODY = "Dicomflow-Body"
H_BLOB = "Dicomflow-Blob"
H_KEY_ID = "Dicomflow-Key-Id"
H_SEALED_SIZE = "Dicomflow-Sealed-Size"
H_TRACEPARENT = "traceparent"
H_MSG_ID = "Nats-Msg-Id"
H_OBJECT_KEY = "Dicomflow-Object-Key"  # on dicom.stored events: where the object is

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODALITY = re.compile(r"[A-Z0-9_ ]{0,16}")
_BLOB = re.compile(r"[A-Za-z0-9._:-]{1,200}")


class BodyKind(StrEnum):
    INLINE = "inline"
    BLOB = "blob"


@dataclass(frozen=True, slots=True)
class Instance:
    """Identity and routing facts of one DICOM instance, and where its bytes are."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    calling_ae: str
    called_ae: str
    transfer_syntax: str
    size: int
    sha256: str
    modality: str = ""
    body: BodyKind = BodyKind.INLINE
    blob: str = ""
    key_id: int | None = None
    sealed_size: int | None = None
    traceparent: str = ""

    @property
    def msg_id(self) -> str:
        """Identity plus digest: a retried publish of the same instance is de-duplicated."""
        return f"{self.sop_instance_uid}:{self.sha256}"

    def with_body(self, body: BodyKind, blob: str = "") -> Instance:
        return replace(self, body=body, blob=blob)

    def sealed(self, key_id: int, sealed_size: int) -> Instance:
        return replace(self, key_id=key_id, sealed_size=sealed_size)

    def headers(self) -> dict[str, str]:
        out = {
            H_SCHEMA: SCHEMA_VERSION,
            H_SOP_CLASS: self.sop_class_uid,
            H_SOP_INSTANCE: self.sop_instance_uid,
            H_STUDY: self.study_uid,
            H_SERIES: self.series_uid,
            H_MODALITY: self.modality,
            H_CALLING_AE: self.calling_ae,
            H_CALLED_AE: self.called_ae,
            H_TRANSFER_SYNTAX: self.transfer_syntax,
            H_SIZE: str(self.size),
            H_SHA256: self.sha256,
            H_BODY: self.body.value,
            H_MSG_ID: self.msg_id,
        }
        if self.blob:
            out[H_BLOB] = self.blob
        if self.key_id is not None:
            out[H_KEY_ID] = str(self.key_id)
        if self.sealed_size is not None:
            out[H_SEALED_SIZE] = str(self.sealed_size)
        if self.traceparent:
            out[H_TRACEPARENT] = self.traceparent
        return out


def parse(headers: dict[str, str] | None, *, sealed: bool = False) -> Instance:
    """Validate message headers against the contract; raise ContractViolation if off."""
    if not headers:
        raise ContractViolation("message has no headers: not a dicomflow instance message")
    h = headers
    if h.get(H_SCHEMA) != SCHEMA_VERSION:
        raise ContractViolation(
            f"unsupported {H_SCHEMA} {h.get(H_SCHEMA)!r} (this build reads {SCHEMA_VERSION!r})"
        )
    body = _enum(h, H_BODY)
    blob = h.get(H_BLOB, "")
    if body is BodyKind.BLOB and not _BLOB.fullmatch(blob):
        raise ContractViolation(f"{H_BLOB} is missing or malformed for a blob body")
    instance = Instance(
        sop_class_uid=_uid(h, H_SOP_CLASS),
        sop_instance_uid=_uid(h, H_SOP_INSTANCE),
        study_uid=_uid(h, H_STUDY),
        series_uid=_uid(h, H_SERIES),
        calling_ae=_text(h, H_CALLING_AE, 16),
        called_ae=_text(h, H_CALLED_AE, 16),
        transfer_syntax=_uid(h, H_TRANSFER_SYNTAX),
        size=_int(h, H_SIZE, minimum=1),
        sha256=_match(h, H_SHA256, _SHA256),
        modality=_match(h, H_MODALITY, _MODALITY, required=False),
        body=body,
        blob=blob if body is BodyKind.BLOB else "",
        traceparent=h.get(H_TRACEPARENT, "")[:128],
    )
    if sealed:
        instance = instance.sealed(
            key_id=_int(h, H_KEY_ID, minimum=0, maximum=2**32 - 1),
            sealed_size=_int(h, H_SEALED_SIZE, minimum=86),
        )
    return instance


def _uid(h: dict[str, str], name: str) -> str:
    value = h.get(name, "")
    if len(value) > 64 or not _UID.fullmatch(value):
        raise ContractViolation(f"{name} is missing or not a DICOM UID")
    return value


def _text(h: dict[str, str], name: str, limit: int) -> str:
    value = h.get(name)
    if value is None or len(value) > limit or not value.isprintable():
        raise ContractViolation(f"{name} is missing or malformed")
    return value


def _int(h: dict[str, str], name: str, *, minimum: int, maximum: int | None = None) -> int:
    raw = h.get(name, "")
    if not raw.isdigit():
        raise ContractViolation(f"{name} is missing or not a non-negative integer")
    value = int(raw)
    if value < minimum or (maximum is not None and value > maximum):
        raise ContractViolation(f"{name} is out of range")
    return value


def _match(h: dict[str, str], name: str, pattern: re.Pattern[str], required: bool = True) -> str:
    value = h.get(name, "")
    if (required or value) and not pattern.fullmatch(value):
        raise ContractViolation(f"{name} is missing or malformed")
    return value


def _enum(h: dict[str, str], name: str) -> BodyKind:
    try:
        return BodyKind(h.get(name, ""))
    except ValueError:
        raise ContractViolation(f"{name} must be one of {[k.value for k in BodyKind]}") from None
