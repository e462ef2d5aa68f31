"""The encryptor's settings: what every service has, its keys (``[encryption]``), its
consumer, and in the hybrid edge the sealed side's connection."""

from __future__ import annotations

from dicomflow.shared.settings import (
    ConsumerSettings,
    EncryptionSettings,
    NatsSettings,
    ServiceSettings,
)
from pydantic import Field


class EncryptorSettings(ServiceSettings):
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)
    # Hybrid edge: the sealed side's connection (EDGE account: publish SEALED, write sealed
    # blobs); ``nats`` is then the plaintext side's (LOCAL: INGEST, plaintext blobs, DLQ).
    # Absent: one connection for both, as in a single zone.
    nats_sealed: NatsSettings | None = None
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
