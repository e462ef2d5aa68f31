"""The one error hierarchy of dicomflow.

    DicomflowError
    ├── ConfigError                 bad settings, config file or CLI argument (exit 2)
    │   └── KeyFileError            a key file (master or signing) missing, unreadable or malformed
    ├── EnvelopeError               an A1 object cannot be read (never retried)
    │   ├── TruncatedEnvelope       fewer than 86 bytes
    │   ├── UnsupportedVersion      the first two bytes are not "A1"
    │   ├── UnknownMasterKey        the key id is not in the key ring
    │   └── IntegrityError          the GCM tag does not verify
    ├── ProcessingError             raised while a stage handles one message
    │   ├── TransientError          worth retrying later: nak with backoff
    │   │   ├── BrokerUnavailable   NATS did not acknowledge a publish (down, full, slow)
    │   │   └── StorageUnavailable  object storage did not answer or failed (5xx, timeout)
    │   └── PermanentError          retrying cannot help: dead-letter with the reason
    │       ├── ContractViolation   headers or body do not match the message contract
    │       │   └── SealNotTrusted  a sealed message's signature or body digest does not verify
    │       ├── DuplicateConflict   same SOP Instance UID, different bytes, policy reject
    │       ├── ObjectMissing       the index names an object that storage does not have
    │       └── DigestMismatch      an object decrypts, but not to the SHA-256 on record
    └── StoreError                  a CLI read of a stored instance failed (not found, ...)

How a ProcessingError (and any other exception) becomes ack / nak / dead-letter is
decided in exactly one place: ``dicomflow.shared.stage.disposition``.

Messages never contain keys, IVs, DEKs or patient data: they name what failed and
what to do about it.
"""

from __future__ import annotations


class DicomflowError(Exception):
    """Base of every error dicomflow raises on purpose."""


class ConfigError(DicomflowError):
    """Settings, a config file or a command-line argument are invalid."""


class KeyFileError(ConfigError):
    """A key file is missing, unreadable or malformed: a master key that is not 32 base64
    bytes, a signing key that is not an unencrypted Ed25519 PEM key of the right kind."""


class EnvelopeError(DicomflowError):
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


class ProcessingError(DicomflowError):
    """Raised by a stage while it handles one message."""

    def dead_letter_headers(self) -> dict[str, str]:
        """Facts for the dead-letter record besides the reason (never patient data)."""
        return {}


class TransientError(ProcessingError):
    """A failure that may pass: the message is nak'ed and delivered again later."""


class BrokerUnavailable(TransientError):
    """NATS JetStream did not acknowledge a publish: unreachable, stream full or too slow."""


class StorageUnavailable(TransientError):
    """Object storage failed or timed out."""


class PermanentError(ProcessingError):
    """A failure that retrying cannot mend: the message is dead-lettered."""


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
