"""Loading the keys the ``[encryption]`` settings name, where they are used.

The settings only hold paths and key ids (``shared.settings.EncryptionSettings``); the
encryptor loads its keyring and signing key, the store-writer its trusted public keys,
the read-side commands the keyring, each through these functions at start-up. Each
refuses to run without what it needs, with a ``ConfigError`` naming the setting.
"""

from __future__ import annotations

from dicomflow.shared.crypto.keyring import KeyRing, MasterKey, load_master_key
from dicomflow.shared.crypto.sealsign import (
    SealSigner,
    SealVerifier,
    load_signing_key,
    load_trusted_keys,
)
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import EncryptionSettings


def load_signer(encryption: EncryptionSettings) -> SealSigner:
    """The encryptor's signing key; refuses to run without one."""
    if encryption.signing_key is None:
        raise ConfigError(
            "encryption.signing_key is not set: the encryptor signs every sealed message "
            "for the store-writers to verify; give its private key as "
            "encryption.signing_key = PATH (or DICOMFLOW_ENCRYPTION__SIGNING_KEY); create "
            "a pair with `dicomflow keys new-signing --out DIR`"
        )
    return load_signing_key(encryption.signing_key, "encryption.signing_key")


def load_verifier(encryption: EncryptionSettings) -> SealVerifier:
    """The store-writer's trusted public signing keys; refuses to run without one."""
    return load_trusted_keys(encryption.trusted_signing_keys, "encryption.trusted_signing_keys")


def load_keyring(encryption: EncryptionSettings) -> KeyRing:
    """Load every key file; refuses to run without a usable current key."""
    if encryption.master_key is None:
        raise ConfigError(
            "encryption.master_key is not set: give a current master key as "
            "[encryption.master_key] id/path (or DICOMFLOW_ENCRYPTION__MASTER_KEY__ID and "
            "__PATH); create one with `dicomflow keys new PATH`"
        )
    current = load_master_key(encryption.master_key.id, encryption.master_key.path)
    previous: list[MasterKey] = [load_master_key(k.id, k.path) for k in encryption.previous_keys]
    return KeyRing(current, previous)
