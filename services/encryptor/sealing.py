"""Sealing one body: hash the plaintext and encrypt it in a single streaming pass."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import IO

from dicomflow.shared.envelope import OVERHEAD, Sealer
from dicomflow.shared.keyring import MasterKey

CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sealed:
    plaintext_size: int
    plaintext_sha256: str
    sealed_size: int
    sealed_sha256: str


def seal_and_hash(key: MasterKey, src: IO[bytes], dst: IO[bytes]) -> Sealed:
    """Write the A1 envelope of ``src`` to ``dst``, hashing the plaintext and the envelope
    as they pass (the envelope's digest is what the signature covers); memory stays at
    one chunk."""
    sealer = Sealer(key)
    digest = hashlib.sha256()
    sealed_digest = hashlib.sha256()

    def out(data: bytes) -> None:
        sealed_digest.update(data)
        dst.write(data)

    size = 0
    out(sealer.prefix)
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        out(sealer.update(chunk))
    out(sealer.finalize())
    return Sealed(size, digest.hexdigest(), size + OVERHEAD, sealed_digest.hexdigest())
