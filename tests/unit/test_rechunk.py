"""Cutting a stream of pieces of any size into blob chunks (``transport._rechunked``)."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator

import pytest
from dicomflow.shared.nats.transport import _rechunked


async def pieces(sizes: list[int], data: bytes) -> AsyncGenerator[bytes, None]:
    at = 0
    for size in sizes:
        yield data[at : at + size]
        at += size


@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [0],
        [70, 16, 16, 16, 3],  # an envelope: prefix, ciphertext pieces, tag
        [16, 16, 16],  # whole chunks pass through
        [1] * 50,
        [100],
        [15, 17, 0, 31, 1],
    ],
)
async def test_chunks_are_full_but_the_last_and_bytes_unchanged(sizes: list[int]) -> None:
    data = os.urandom(sum(sizes))
    chunks = [c async for c in _rechunked(pieces(sizes, data), 16)]
    assert b"".join(chunks) == data
    assert all(len(c) == 16 for c in chunks[:-1])
    assert all(0 < len(c) <= 16 for c in chunks)
