"""The A1 read path on arbitrary and mutated bytes: only typed envelope errors, and
never plaintext from an altered object."""

from __future__ import annotations

import io

import pytest
from dicomflow.shared.crypto.envelope import (
    OVERHEAD,
    PREFIX_LEN,
    key_id_of,
    open_bytes,
    open_stream,
    seal,
)
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey
from dicomflow.shared.errors import EnvelopeError
from hypothesis import assume, given
from hypothesis import strategies as st

KEY = MasterKey(1, bytes(range(32)))
RING = KeyRing(KEY, [MasterKey(2, bytes(range(32, 64)))])


@given(st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_envelope_errors(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        open_bytes(RING, data)
    try:
        assert 0 <= key_id_of(data) < 2**32
    except EnvelopeError:
        assert len(data) < PREFIX_LEN or data[:2] != b"A1"


@st.composite
def altered(draw: st.DrawFn) -> tuple[bytes, bytes]:
    plaintext = draw(st.binary(min_size=1, max_size=300))
    sealed = bytearray(seal(KEY, plaintext))
    kind = draw(st.sampled_from(["flip", "truncate", "extend", "key_id"]))
    if kind == "flip":
        at = draw(st.integers(0, len(sealed) - 1))
        sealed[at] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del sealed[draw(st.integers(0, len(sealed) - 1)) :]
    elif kind == "extend":
        sealed += draw(st.binary(min_size=1, max_size=32))
    else:
        sealed[2:6] = draw(st.sampled_from([b"\x02\0\0\0", b"\x09\0\0\0", b"\xff\xff\xff\xff"]))
    return plaintext, bytes(sealed)


@given(altered())
def test_an_altered_object_never_opens(case: tuple[bytes, bytes]) -> None:
    _, sealed = case
    with pytest.raises(EnvelopeError):
        open_bytes(RING, sealed)


@given(altered(), st.integers(0, 512), st.integers(1, 64))
def test_streamed_reads_of_altered_objects_raise_typed_errors(
    case: tuple[bytes, bytes], declared: int, chunk: int
) -> None:
    plaintext, sealed = case
    # Reading exactly the original length of an extended object is a genuine read.
    assume(declared != len(plaintext) + OVERHEAD)
    with pytest.raises(EnvelopeError):
        open_stream(RING, io.BytesIO(sealed), io.BytesIO(), size=declared, chunk_size=chunk)


@given(st.binary(max_size=300), st.integers(1, 64))
def test_intact_objects_open_in_any_chunking(plaintext: bytes, chunk: int) -> None:
    sealed = seal(KEY, plaintext)
    out = io.BytesIO()
    open_stream(RING, io.BytesIO(sealed), out, size=len(sealed), chunk_size=chunk)
    assert out.getvalue() == plaintext
    assert len(sealed) == len(plaintext) + OVERHEAD
