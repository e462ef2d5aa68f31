"""Sealing one body into an A1 envelope, hashing the envelope as it is made (its SHA-256
is what the encryptor's signature covers). The plaintext is checked against the
gateway's size and digest by the body itself (``shared.stage.delivery.Body``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator

from dicomflow.shared.crypto.envelope import Sealer
from dicomflow.shared.crypto.keyring import MasterKey


def seal_bytes(key: MasterKey, plain: bytes) -> tuple[bytes, str]:
    """The A1 envelope of ``plain`` and its hex SHA-256, in memory: one copy of the
    ciphertext (the join), each piece hashed where it is made."""
    sealer = Sealer(key)
    pieces = (sealer.prefix, sealer.update(plain), sealer.finalize())
    digest = hashlib.sha256()
    for piece in pieces:
        digest.update(piece)
    return b"".join(pieces), digest.hexdigest()


async def sealed_pieces(key: MasterKey, plain: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """The A1 envelope of what ``plain`` yields, piece by piece, each sealed in a worker
    thread (``plain`` is closed when done)."""
    sealer = Sealer(key)
    yield sealer.prefix
    async with contextlib.aclosing(plain):  # type: ignore[type-var]
        async for piece in plain:
            yield await asyncio.to_thread(sealer.update, piece)
    yield sealer.finalize()
