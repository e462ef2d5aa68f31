"""Signatures over sealed messages: the encryptor signs what it seals, the store-writer
verifies before it writes.

The store-writer holds no master key, so it cannot check an envelope's GCM tag nor
whether its key id is one anybody holds. It trusts a SEALED message because it carries
an Ed25519 signature, by a signing key it trusts, over the message's identity and the
SHA-256 of its sealed body. Trust thus does not depend on master-key ids: a message
sealed under a brand-new master key is stored during a rotation, while a forged one,
or a body altered after sealing, is dead-lettered with the reason.

The signed bytes (``signed_bytes``) are a domain-separation label with its version,
then each signed field as its header name and value, both length-prefixed (4-byte
big-endian), in a fixed order: nothing one field holds can be moved into another.
Signing keys are independent of master keys and rotated by trusting the new public key
on every store-writer first, then switching the encryptor.

Key material never appears in a repr, a log line or an error: errors name the setting
and the file, never their content.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from dicomflow.shared.contracts import messages
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.crypto.keyfiles import read_key_file, write_new_key_file
from dicomflow.shared.errors import ConfigError, KeyFileError, SealNotTrusted

DOMAIN = b"dicomflow sealed message"
VERSION = b"1"
PRIVATE_NAME = "signing.pem"
PUBLIC_NAME = "signing.pub.pem"
SIGNER_ID_HEX = 16  # hex digits of the SHA-256 of the raw public key that name a signer

_MAKE_ONE = "make a pair with `dicomflow keys new-signing --out DIR`"


def signer_id(public: Ed25519PublicKey) -> str:
    """A short fingerprint naming a signing key in headers and errors (not secret)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:SIGNER_ID_HEX]


def signed_bytes(instance: Instance) -> bytes:
    """The canonical bytes a sealed message's signature covers."""
    fields = (
        (messages.H_SCHEMA, messages.SCHEMA_VERSION),
        (messages.H_SOP_CLASS, instance.sop_class_uid),
        (messages.H_SOP_INSTANCE, instance.sop_instance_uid),
        (messages.H_STUDY, instance.study_uid),
        (messages.H_SERIES, instance.series_uid),
        (messages.H_MODALITY, instance.modality),
        (messages.H_CALLING_AE, instance.calling_ae),
        (messages.H_CALLED_AE, instance.called_ae),
        (messages.H_TRANSFER_SYNTAX, instance.transfer_syntax),
        (messages.H_SIZE, str(instance.size)),
        (messages.H_SHA256, instance.sha256),
        (messages.H_KEY_ID, "" if instance.key_id is None else str(instance.key_id)),
        (messages.H_SEALED_SIZE, "" if instance.sealed_size is None else str(instance.sealed_size)),
        (messages.H_SEALED_SHA256, instance.sealed_sha256),
        (messages.H_SIGNER, instance.signer),
    )
    out = bytearray()
    for item in (DOMAIN, VERSION, *(part.encode() for field in fields for part in field)):
        out += len(item).to_bytes(4, "big")
        out += item
    return bytes(out)


class SealSigner:
    """The encryptor's private signing key."""

    __slots__ = ("_key", "signer")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.signer = signer_id(key.public_key())

    def sign(self, instance: Instance) -> Instance:
        """``instance`` (sealed: key id, sealed size and digest set) with its signature."""
        named = instance.signed(self.signer, "")
        return named.signed(self.signer, self._key.sign(signed_bytes(named)).hex())

    def __repr__(self) -> str:
        return f"SealSigner(signer={self.signer}, key=<hidden>)"


class SealVerifier:
    """The store-writer's trusted public signing keys."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[Ed25519PublicKey]) -> None:
        self._keys = {signer_id(k): k for k in keys}

    @property
    def signers(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def verify(self, instance: Instance) -> None:
        """Raise SealNotTrusted unless a trusted key signed this message's headers."""
        key = self._keys.get(instance.signer)
        if key is None:
            raise SealNotTrusted(
                f"signature check failed: the message is signed by signing key "
                f"{instance.signer}, which is not among encryption.trusted_signing_keys "
                f"({', '.join(self._keys)})"
            )
        try:
            key.verify(bytes.fromhex(instance.signature), signed_bytes(instance))
        except (InvalidSignature, ValueError):
            raise SealNotTrusted(
                f"signature check failed: {messages.H_SIGNATURE} does not verify under "
                f"signing key {instance.signer}; the headers were altered or forged"
            ) from None

    @staticmethod
    def check_digest(instance: Instance, sha256: str) -> None:
        """Raise SealNotTrusted unless ``sha256`` (of the bytes to store) is the signed one."""
        if sha256 != instance.sealed_sha256:
            raise SealNotTrusted(
                f"digest check failed: the sealed body's SHA-256 differs from the signed "
                f"{messages.H_SEALED_SHA256}; the body was altered after sealing"
            )

    def __repr__(self) -> str:
        return f"SealVerifier(signers={self.signers})"


def load_signing_key(path: Path, setting: str) -> SealSigner:
    """The Ed25519 private key in PEM file ``path`` (configured as ``setting``)."""
    data = read_key_file(path, f"{setting}: key file", _MAKE_ONE)
    if b"PUBLIC KEY-----" in data:
        raise KeyFileError(
            f"{setting}: {path} holds a public key; the encryptor needs the private key "
            f"({PRIVATE_NAME}); the public key goes to the store-writers' "
            "encryption.trusted_signing_keys"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(
            f"{setting}: {path} is password-protected; give an unencrypted PEM key and "
            "protect the file instead (mode 0600, a secret store)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"{setting}: {path} is not a PEM private key; {_MAKE_ONE}"
        ) from None  # no detail: it may quote part of the file
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{setting}: {path} holds a {_kind(key)} key; an Ed25519 key is needed ({_MAKE_ONE})"
        )
    return SealSigner(key)


def load_trusted_keys(paths: Sequence[Path], setting: str) -> SealVerifier:
    """The Ed25519 public keys in PEM files ``paths`` (configured as ``setting``)."""
    if not paths:
        raise ConfigError(
            f"{setting} is not set: the store-writer stores only sealed messages signed by a "
            f"trusted encryptor; give the encryptor's public signing key(s), e.g. "
            f'{setting} = ["/keys/{PUBLIC_NAME}"] (or DICOMFLOW_'
            f"{setting.upper().replace('.', '__')}='[\"...\"]'); {_MAKE_ONE}"
        )
    keys: list[Ed25519PublicKey] = []
    for path in paths:
        data = read_key_file(path, f"{setting}: key file", _MAKE_ONE, secret=False)
        if b"PRIVATE KEY-----" in data:
            raise KeyFileError(
                f"{setting}: {path} holds a private key; store-writers get only the public "
                f"key ({PUBLIC_NAME}), so that they cannot sign"
            )
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise KeyFileError(f"{setting}: {path} is not a PEM public key; {_MAKE_ONE}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(
                f"{setting}: {path} holds a {_kind(key)} key; an Ed25519 key is needed "
                f"({_MAKE_ONE})"
            )
        keys.append(key)
    return SealVerifier(keys)


def generate_signing_key_pair(folder: Path) -> tuple[Path, Path]:
    """Write a fresh pair to ``folder``: the private key (0600) and its public key.

    Refuses to overwrite either file.
    """
    private_path, public_path = folder / PRIVATE_NAME, folder / PUBLIC_NAME
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(f"refusing to overwrite existing file {path}; choose another folder")
    write_new_key_file(private_path, private_pem, 0o600, "signing key file")
    try:
        write_new_key_file(public_path, public_pem, 0o644, "public key file")
    except BaseException:
        with contextlib.suppress(OSError):
            private_path.unlink()
        raise
    return private_path, public_path


def _kind(key: object) -> str:
    name = type(key).__name__
    for suffix in ("PrivateKey", "PublicKey"):
        name = name.removeprefix("_").removesuffix(suffix)
    return name or "different"
