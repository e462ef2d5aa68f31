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


def seal_and_hash(key: MasterKey, src: IO[bytes], dst: IO[bytes]) -> Sealed:
    """Write the A1 envelope of ``src`` to ``dst``; memory stays at one chunk."""
    sealer = Sealer(key)
    digest = hashlib.sha256()
    size = 0
    dst.write(sealer.prefix)
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
        dst.write(sealer.update(chunk))
    dst.write(sealer.finalize())
    return Sealed(size, digest.hexdigest(), size + OVERHEAD)
