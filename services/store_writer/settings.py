"""The store-writer's settings: storage, the trusted signing keys, its consumer, and
what it does with a second instance under a stored SOP Instance UID."""

from __future__ import annotations

from enum import StrEnum

from dicomflow.shared.settings import (
    ConsumerSettings,
    EncryptionSettings,
    ServiceSettings,
    StorageSettings,
)
from pydantic import Field


class DuplicatePolicy(StrEnum):
    REJECT = "reject"
    KEEP_BOTH = "keep-both"
    OVERWRITE = "overwrite"


class StoreWriterSettings(ServiceSettings):
    storage: StorageSettings = Field(default_factory=StorageSettings)
    # Only encryption.trusted_signing_keys: the store-writer never holds a master key.
    encryption: EncryptionSettings = Field(default_factory=EncryptionSettings)
    consumer: ConsumerSettings = Field(default_factory=ConsumerSettings)
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.REJECT
