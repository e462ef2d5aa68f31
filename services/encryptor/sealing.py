"""Sealing one body into an A1 envelope, hashing the envelope as it is written (its
SHA-256 is what the encryptor's signature covers). The plaintext is checked against
the gateway's size and digest by the body itself (``shared.stage.delivery.Body``)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import IO

from dicomflow.shared.crypto.envelope import Sealer
from dicomflow.shared.crypto.keyring import MasterKey


def seal_into(key: MasterKey, plain: bytes, out: IO[bytes]) -> tuple[int, str]:
    """Write the A1 envelope of ``plain`` to ``out``; return its size and hex SHA-256."""
    sealer = Sealer(key)
    digest = hashlib.sha256()
    size = 0
    for piece in (sealer.prefix, sealer.update(plain), sealer.finalize()):
        digest.update(piece)
        out.write(piece)
        size += len(piece)
    return size, digest.hexdigest()


async def sealed_pieces(key: MasterKey, plain: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """The A1 envelope of what ``plain`` yields, piece by piece, each sealed in a worker
    thread (``plain`` is closed when done)."""
    sealer = Sealer(key)
    yield sealer.prefix
    async with contextlib.aclosing(plain):  # type: ignore[type-var]
        async for piece in plain:
            yield await asyncio.to_thread(sealer.update, piece)
    yield sealer.finalize()
