"""Sealing one body: hash the plaintext and encrypt it in a single streaming pass."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import IO

from dicomflow.shared.crypto.envelope import OVERHEAD, Sealer
from dicomflow.shared.crypto.keyring import MasterKey

CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sealed:
    plaintext_size: int
    plaintext_sha256: str
    sealed_size: int
    sealed_sha256: str


class HashingSealer:
    """Seals one body that arrives in pieces, hashing the plaintext as it passes:
    ``prefix``, then ``update`` for each piece, then ``finalize`` (the tag)."""

    __slots__ = ("_digest", "_sealer", "prefix", "size")

    def __init__(self, key: MasterKey) -> None:
        self._sealer = Sealer(key)
        self._digest = hashlib.sha256()
        self.prefix = self._sealer.prefix
        self.size = 0  # plaintext bytes so far

    def update(self, chunk: bytes) -> bytes:
        self._digest.update(chunk)
        self.size += len(chunk)
        return self._sealer.update(chunk)

    def finalize(self) -> bytes:
        return self._sealer.finalize()

    @property
    def plaintext_sha256(self) -> str:
        return self._digest.hexdigest()


def seal_and_hash(key: MasterKey, src: IO[bytes], dst: IO[bytes]) -> Sealed:
    """Write the A1 envelope of ``src`` to ``dst``, hashing the plaintext and the envelope
    as they pass (the envelope's digest is what the signature covers); memory stays at
    one chunk."""
    sealer = HashingSealer(key)
    sealed_digest = hashlib.sha256()

    def out(data: bytes) -> None:
        sealed_digest.update(data)
        dst.write(data)

    out(sealer.prefix)
    while chunk := src.read(CHUNK):
        out(sealer.update(chunk))
    out(sealer.finalize())
    size = sealer.size
    return Sealed(size, sealer.plaintext_sha256, size + OVERHEAD, sealed_digest.hexdigest())
