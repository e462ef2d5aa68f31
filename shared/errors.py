"""The one error hierarchy of dicomflow.

    DicomflowError
    ├── ConfigError                 bad settings, config file or CLI argument (exit 2)
    │   └── KeyFileError            a key file (master or signing) missing, unreadable or malformed
    ├── ProcessingError             raised while a stage handles one message
    │   ├── TransientError          worth retrying later: nak with backoff
    │   │   └── Outage              NATS or storage is away: first ridden out in place
    │   │       ├── BrokerUnavailable   NATS did not answer (down, full, slow, connection lost)
    │   │       └── StorageUnavailable  object storage did not answer or failed (5xx, timeout)
    │   └── PermanentError          retrying cannot help: dead-letter with the reason
    │       ├── EnvelopeError       an A1 object cannot be read
    │       │   ├── TruncatedEnvelope   fewer than 86 bytes
    │       │   ├── UnsupportedVersion  the first two bytes are not "A1"
    │       │   ├── UnknownMasterKey    the key id is not in the key ring
    │       │   └── IntegrityError      the GCM tag does not verify
    │       ├── ContractViolation   headers or body do not match the message contract
    │       │   └── SealNotTrusted  a sealed message's signature or body digest does not verify
    │       ├── DuplicateConflict   same SOP Instance UID, different bytes, policy reject
    │       ├── ObjectMissing       the index names an object that storage does not have
    │       └── DigestMismatch      an object decrypts, but not to the SHA-256 on record
    └── StoreError                  a CLI read of a stored instance failed (not found, ...)

The type alone says what happens to a message: ``PermanentError`` is dead-lettered,
``Outage`` is tried again in place for ``consumer.outage_grace`` seconds and then naked,
any other ``TransientError`` (and any exception that is not a ``DicomflowError``) is
naked with backoff and dead-lettered when its deliveries are spent. Library exceptions
become these types at the edges, each through one table (``ErrorTable``):
``dicomflow.shared.nats.errormap`` and ``dicomflow.shared.storage.errormap``
(docs/errors.md).

How a ProcessingError (and any other exception) becomes ack / nak / dead-letter is
decided in exactly one place: ``dicomflow.shared.stage.disposition``.

Messages never contain keys, IVs, DEKs or patient data: they name what failed and
what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dicomflow.shared.telemetry.redact import redact


class DicomflowError(Exception):
    """Base of every error dicomflow raises on purpose."""


class ConfigError(DicomflowError):
    """Settings, a config file or a command-line argument are invalid."""


class KeyFileError(ConfigError):
    """A key file is missing, unreadable or malformed: a master key that is not 32 base64
    bytes, a signing key that is not an unencrypted Ed25519 PEM key of the right kind."""


class ProcessingError(DicomflowError):
    """Raised by a stage while it handles one message (an ``EnvelopeError`` also when a
    command reads a stored object)."""

    def dead_letter_headers(self) -> dict[str, str]:
        """Facts for the dead-letter record besides the reason (never patient data)."""
        return {}


class TransientError(ProcessingError):
    """A failure that may pass: the message is nak'ed and delivered again later."""


class Outage(TransientError):
    """What a stage needs is away (NATS, object storage), not wrong with the message: the
    consumer tries again in place for ``consumer.outage_grace`` seconds, spending none of
    the message's deliveries, before it naks."""


class BrokerUnavailable(Outage):
    """NATS JetStream did not answer: unreachable, connection lost, stream full or too slow."""


class StorageUnavailable(Outage):
    """Object storage failed or timed out."""


class PermanentError(ProcessingError):
    """A failure that retrying cannot mend: the message is dead-lettered."""


class EnvelopeError(PermanentError):
    """An A1 envelope cannot be decrypted. Permanent: retrying gives the same answer."""


class TruncatedEnvelope(EnvelopeError):
    """The object is shorter than the 86-byte A1 overhead."""


class UnsupportedVersion(EnvelopeError):
    """The object does not start with the A1 version marker."""


class UnknownMasterKey(EnvelopeError):
    """The object's master-key id is not in the key ring."""

    def __init__(self, key_id: int) -> None:
        super().__init__(f"unknown master key id {key_id}")
        self.key_id = key_id


class IntegrityError(EnvelopeError):
    """The GCM tag did not verify: the object was altered or the key is wrong."""


class ContractViolation(PermanentError):
    """A message does not follow the header/body contract of its stream."""


class SealNotTrusted(ContractViolation):
    """A SEALED message is not signed by a trusted encryptor signing key, or its body is
    not the one that was signed (see ``sealsign``)."""


class DuplicateConflict(PermanentError):
    """The SOP Instance UID is already stored with different bytes (policy: reject)."""


class ObjectMissing(PermanentError):
    """The index (or a request) names an object that is not in storage."""


class DigestMismatch(PermanentError):
    """An object decrypted with a valid tag, but not to the SHA-256 on record."""


class StoreError(DicomflowError):
    """A stored instance cannot be listed, fetched or verified."""


Row = tuple[type[BaseException], type[DicomflowError]]


@dataclass(frozen=True, slots=True)
class ErrorTable:
    """How one edge's library exceptions become dicomflow's (in the manner of httpx's
    ``map_httpcore_exceptions``): ``with table.mapping("reading the index"): ...``.

    ``answers`` are replies the caller decides on ("not found", "already exists"): they
    leave the block as they are. Otherwise the first row whose library type matches
    gives the dicomflow type, raised from the original with ``what`` (what failed, e.g.
    "could not read the index"), the library's type and the first line of its text (UIDs
    redacted: a storage error's text names the object), and ``advice``. A
    ``DicomflowError`` raised inside, and anything no row names, leave the block
    unchanged.
    """

    answers: tuple[type[BaseException], ...]
    rows: tuple[Row, ...]

    def target(self, exc: BaseException) -> type[DicomflowError] | None:
        """The dicomflow type ``exc`` becomes, or None where it leaves unchanged."""
        if isinstance(exc, (DicomflowError, *self.answers)):
            return None
        for source, target in self.rows:
            if isinstance(exc, source):
                return target
        return None

    @contextmanager
    def mapping(self, what: str, advice: str = "") -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            target = self.target(exc)
            if target is None:
                raise
            raise target(describe(what, exc, advice)) from exc


def describe(what: str, exc: BaseException, advice: str = "") -> str:
    """``what`` (what failed), with the library's type and the first line of its text
    (UIDs redacted, at most 300 characters), then ``advice``."""
    try:
        text = str(exc).strip()
    except Exception:  # noqa: BLE001 (a library's __str__ that fails must not hide the error)
        text = ""
    text = text.splitlines()[0][:300] if text else ""
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    message = redact(f"{what} ({detail})")
    return f"{message}; {advice}" if advice else message
