"""The header contract of every message between stages.

Headers carry the DICOM identity and routing facts, never patient demographics. The
body is either the bytes themselves (``Dicomflow-Body: inline``) or, above the inline
limit, a reference to a chunked object in the blob bucket (``Dicomflow-Body: blob``
and ``Dicomflow-Blob: <name>``). ``parse`` validates every header before a stage uses
it; anything off raises ``ContractViolation`` and the message is dead-lettered.

``CONTRACTS`` names the contract of each stream, and ``decode`` (``check_delivery``) is
what the consumer runs on every INGEST and SEALED message before the stage's handler
sees it: the headers, plus what can be checked of the body without
reading a blob (an inline body's length; a sealed body's A1 prefix and key id). Reasons
name the header that is off, never its value: a forged value may carry patient data.

A SEALED message also carries the SHA-256 of its sealed body and the encryptor's
Ed25519 signature over its headers and that digest (``Dicomflow-Sealed-Sha256``,
``Dicomflow-Signer``, ``Dicomflow-Signature``). Their form is checked here; the
store-writer verifies the signature and the body's digest (``sealsign``), since only it
holds the trusted public keys.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from types import MappingProxyType

from dicomflow.shared.contracts import subjects
from dicomflow.shared.crypto.envelope import OVERHEAD, key_id_of
from dicomflow.shared.errors import ContractViolation, EnvelopeError

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
H_SEALED_SHA256 = "Dicomflow-Sealed-Sha256"  # of the sealed body, as signed
H_SIGNER = "Dicomflow-Signer"  # fingerprint of the encryptor's signing key
H_SIGNATURE = "Dicomflow-Signature"  # Ed25519, hex; see ``sealsign``
H_TRACEPARENT = "traceparent"
H_MSG_ID = "Nats-Msg-Id"
H_OBJECT_KEY = "Dicomflow-Object-Key"  # on dicom.stored events: where the object is
# On dicom.stored events: how the sealed body travelled on SEALED ("inline" or "blob");
# the scu-gateway relays inline bodies before storage and routes blobs once stored.
H_SEALED_BODY = "Dicomflow-Sealed-Body"

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MODALITY = re.compile(r"[A-Z0-9_ ]{0,16}")
# AE titles: the DICOM default repertoire without backslash or control characters.
_AE = re.compile(r"[\x20-\x5b\x5d-\x7e]{0,16}")
_BLOB_TAIL = re.compile(r"[0-9A-Za-z]{22}")  # a NUID: fresh for every put
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_DIGITS = re.compile(r"[0-9]{1,19}")
_SIGNER = re.compile(r"[0-9a-f]{16}")
_SIGNATURE = re.compile(r"[0-9a-f]{128}")
MAX_SIZE = 2**62  # far above any dataset; keeps sizes within a signed 64-bit integer
INGEST_BLOB_PREFIX = "ingest"
SEALED_BLOB_PREFIX = "sealed"


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
    sealed_sha256: str = ""
    signer: str = ""
    signature: str = ""
    traceparent: str = ""

    @property
    def msg_id(self) -> str:
        """Identity plus digest: a retried publish of the same instance is de-duplicated."""
        return f"{self.sop_instance_uid}:{self.sha256}"

    @property
    def ref(self) -> str:
        """A reference to this instance (of these bytes) that identifies nothing by
        itself: the first 16 hex digits of the SHA-256 of its SOP Instance UID and its
        plaintext digest. Logs, errors, dead-letter reasons and blob names carry this,
        never the UID; `dicomflow ls` shows it beside each instance."""
        return reference(self.sop_instance_uid, self.sha256)

    def with_body(self, body: BodyKind, blob: str = "") -> Instance:
        return replace(self, body=body, blob=blob)

    def sealed(self, key_id: int, sealed_size: int, sealed_sha256: str) -> Instance:
        return replace(self, key_id=key_id, sealed_size=sealed_size, sealed_sha256=sealed_sha256)

    def signed(self, signer: str, signature: str) -> Instance:
        return replace(self, signer=signer, signature=signature)

    def unsigned(self) -> Instance:
        """Without the sealed body's digest and signature (events after storage)."""
        return replace(self, sealed_sha256="", signer="", signature="")

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
        for name, value in (
            (H_SEALED_SHA256, self.sealed_sha256),
            (H_SIGNER, self.signer),
            (H_SIGNATURE, self.signature),
        ):
            if value:
                out[name] = value
        if self.traceparent:
            out[H_TRACEPARENT] = self.traceparent
        return out


def is_uid(value: str) -> bool:
    """A DICOM UID as the contract accepts it: digits and dots, at most 64 characters."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


def parse(
    headers: dict[str, str] | None, *, sealed: bool = False, signed: bool = False
) -> Instance:
    """Validate message headers against the contract; raise ContractViolation if off.

    ``sealed``: key id and sealed size are required (SEALED messages, and the events and
    delivery requests after them); ``signed`` as well: the sealed body's digest, signer
    and signature (SEALED messages only; events after storage carry none).

    A blob body must name this instance's own blob under the stage's prefix
    (``ingest.`` before sealing, ``sealed.`` after): never another instance's object
    nor anything outside the prefix.
    """
    if not headers:
        raise ContractViolation("message has no headers: not a dicomflow instance message")
    h = headers
    if h.get(H_SCHEMA) != SCHEMA_VERSION:
        raise ContractViolation(f"unsupported {H_SCHEMA} (this build reads {SCHEMA_VERSION!r})")
    body = _enum(h, H_BODY)
    instance = Instance(
        sop_class_uid=_uid(h, H_SOP_CLASS),
        sop_instance_uid=_uid(h, H_SOP_INSTANCE),
        study_uid=_uid(h, H_STUDY),
        series_uid=_uid(h, H_SERIES),
        calling_ae=_match(h, H_CALLING_AE, _AE),
        called_ae=_match(h, H_CALLED_AE, _AE),
        transfer_syntax=_uid(h, H_TRANSFER_SYNTAX),
        size=_int(h, H_SIZE, minimum=1, maximum=MAX_SIZE),
        sha256=_match(h, H_SHA256, _SHA256),
        modality=_match(h, H_MODALITY, _MODALITY, required=False),
        body=body,
        traceparent=_match(h, H_TRACEPARENT, _TRACEPARENT, required=False),
    )
    if body is BodyKind.BLOB:
        prefix = SEALED_BLOB_PREFIX if sealed else INGEST_BLOB_PREFIX
        instance = instance.with_body(body, _blob(h, prefix, instance))
    elif H_BLOB in h:
        raise ContractViolation(f"{H_BLOB} is set on a message whose body is inline")
    if sealed:
        instance = instance.sealed(
            key_id=_int(h, H_KEY_ID, minimum=0, maximum=2**32 - 1),
            sealed_size=_int(h, H_SEALED_SIZE, minimum=OVERHEAD, maximum=MAX_SIZE + OVERHEAD),
            sealed_sha256=_match(h, H_SEALED_SHA256, _SHA256, required=signed),
        )
        if signed:
            instance = instance.signed(
                _match(h, H_SIGNER, _SIGNER), _match(h, H_SIGNATURE, _SIGNATURE)
            )
    return instance


def decode_ingest(headers: dict[str, str] | None, data: bytes) -> Instance:
    """The contract of an INGEST message: the plaintext instance's headers, and an
    inline body of the declared size (a blob body: an empty payload)."""
    instance = parse(headers)
    _check_payload(instance, data, instance.size, H_SIZE)
    return instance


def decode_sealed(headers: dict[str, str] | None, data: bytes) -> Instance:
    """The contract of a SEALED message: sealed and signed headers, a sealed size of the
    plaintext's plus the A1 overhead, and an inline body that is an A1 envelope under
    the key id the headers name."""
    instance = parse(headers, sealed=True, signed=True)
    if instance.sealed_size != instance.size + OVERHEAD:
        raise ContractViolation(
            f"{H_SEALED_SIZE} must be {H_SIZE} plus the {OVERHEAD}-byte A1 overhead"
        )
    _check_payload(instance, data, instance.sealed_size, H_SEALED_SIZE)
    if instance.body is BodyKind.INLINE:
        check_envelope(instance, data)
    return instance


Decoder = Callable[[dict[str, str] | None, bytes], Instance]

CONTRACTS: Mapping[str, Decoder] = MappingProxyType(
    {
        subjects.INGEST_STREAM: decode_ingest,
        subjects.SEALED_STREAM: decode_sealed,
    }
)
"""The instance contract of each stream whose messages carry an instance and its
body, checked before a stage's handler sees one. The other streams carry other
contracts: EVENTS the dicom.stored events and DELIVERY the delivery requests (both
checked by the scu-gateway's ``request``), DLQ the dead letters (``deadletters``)."""


def decode(stream: str, headers: dict[str, str] | None, data: bytes) -> Instance | None:
    """The instance of a message consumed from ``stream``, checked against the stream's
    contract (``CONTRACTS``); None for a stream that has none here. Raises
    ContractViolation."""
    contract = CONTRACTS.get(stream)
    return None if contract is None else contract(headers, data)


def check_delivery(stream: str, headers: dict[str, str] | None, data: bytes) -> None:
    """Validate a message consumed from ``stream`` before its handler uses it
    (``decode``, its result unused). Raises ContractViolation."""
    decode(stream, headers, data)


def _check_payload(instance: Instance, data: bytes, declared: int | None, name: str) -> None:
    if instance.body is BodyKind.BLOB:
        if data:
            raise ContractViolation("a message with a blob body must have an empty payload")
    elif len(data) != declared:
        raise ContractViolation(f"the inline body is {len(data)} bytes, but {name} says {declared}")


def check_envelope(instance: Instance, data: bytes) -> None:
    """The sealed body (its first ``OVERHEAD`` bytes suffice) is an A1 envelope under
    the key id the headers name."""
    try:
        key_id = key_id_of(data[:OVERHEAD])
    except EnvelopeError as exc:
        raise ContractViolation(f"the sealed body is not an A1 envelope: {exc}") from exc
    if key_id != instance.key_id:
        raise ContractViolation(f"the A1 envelope's key id differs from {H_KEY_ID}")


def _uid(h: dict[str, str], name: str) -> str:
    value = _get(h, name)
    if not is_uid(value):
        raise ContractViolation(f"{name} is missing or not a DICOM UID")
    return value


def _int(h: dict[str, str], name: str, *, minimum: int, maximum: int | None = None) -> int:
    raw = _get(h, name)
    if not _DIGITS.fullmatch(raw):
        raise ContractViolation(f"{name} is missing or not a decimal integer of 1 to 19 digits")
    value = int(raw)
    if value < minimum or (maximum is not None and value > maximum):
        raise ContractViolation(f"{name} is out of range")
    return value


def _match(h: dict[str, str], name: str, pattern: re.Pattern[str], required: bool = True) -> str:
    value = _get(h, name)
    if (required or value) and not pattern.fullmatch(value):
        raise ContractViolation(f"{name} is missing or malformed")
    return value


def reference(sop_instance_uid: str, sha256: str) -> str:
    """``Instance.ref`` of an instance known by its UID and plaintext digest."""
    return hashlib.sha256(f"{sop_instance_uid}\n{sha256}".encode()).hexdigest()[:16]


def _blob(h: dict[str, str], prefix: str, instance: Instance) -> str:
    """The blob name, which must be ``<prefix>.<the instance's ref>.<NUID>``: a message
    can name only a blob written for this instance (of these bytes)."""
    name = _get(h, H_BLOB)
    head = f"{prefix}.{instance.ref}."
    if not (name.startswith(head) and _BLOB_TAIL.fullmatch(name[len(head) :])):
        raise ContractViolation(
            f"{H_BLOB} is missing or does not name this instance's own blob "
            f"(expected {prefix}.<the instance's reference>.<NUID>)"
        )
    return name


def _get(h: dict[str, str], name: str) -> str:
    """A header value, "" when absent; anything but a string is a violation."""
    value = h.get(name, "")
    if not isinstance(value, str):
        raise ContractViolation(f"{name} is not a text header")
    return value


def _enum(h: dict[str, str], name: str) -> BodyKind:
    try:
        return BodyKind(_get(h, name))
    except ValueError:
        raise ContractViolation(f"{name} must be one of {[k.value for k in BodyKind]}") from None
