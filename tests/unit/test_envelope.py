"""The A1 envelope against the byte-exact spec and an independent reference."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from dicomflow.shared.crypto.envelope import (
    OVERHEAD,
    PREFIX_LEN,
    TAG_LEN,
    VERSION,
    Sealer,
    key_id_of,
    open_bytes,
    open_stream,
    open_to_path,
    seal,
    seal_stream,
)
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey
from dicomflow.shared.errors import (
    IntegrityError,
    TruncatedEnvelope,
    UnknownMasterKey,
    UnsupportedVersion,
)

KEK1 = bytes(range(32))
KEK2 = bytes(range(100, 132))
KEY1 = MasterKey(1, KEK1)
KEY2 = MasterKey(2, KEK2)
RING1 = KeyRing(KEY1)
DEK = bytes.fromhex("00112233445566778899aabbccddeeff" * 2)
IV = bytes(range(200, 232))
MiB = 1024 * 1024


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def reference_seal(kek: bytes, key_id: int, dek: bytes, iv: bytes, plaintext: bytes) -> bytes:
    """The spec, written independently of the module: KS from two raw AES blocks."""
    # ECB here only computes AES_KEK(counter block 0) || AES_KEK(counter block 1).
    blocks = Cipher(algorithms.AES(kek), modes.ECB()).encryptor()  # noqa: S305
    ks = blocks.update(bytes(16) + (1).to_bytes(16, "big")) + blocks.finalize()
    prefix = b"A1" + struct.pack("<I", key_id) + _xor(iv, ks) + _xor(dek, ks)
    return prefix + AESGCM(dek).encrypt(iv, plaintext, prefix)


def sealed_with_material(key: MasterKey, plaintext: bytes, *, step: int = 0) -> bytes:
    sealer = Sealer._with_material(key, DEK, IV)
    step = step or max(len(plaintext), 1)
    body = b"".join(sealer.update(plaintext[i : i + step]) for i in range(0, len(plaintext), step))
    return sealer.prefix + body + sealer.finalize()


class ShortReads(io.RawIOBase):
    """A non-seekable stream that returns at most ``step`` bytes per read."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._step, len(self._data) - self._pos)
        buffer[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n


# --- layout and known answers -----------------------------------------------------


def test_constants_match_the_spec() -> None:
    assert (PREFIX_LEN, TAG_LEN, OVERHEAD, VERSION) == (70, 16, 86, b"A1")


@pytest.mark.parametrize("plaintext", [b"", b"x", b"dicomflow A1 known answer" * 5])
def test_known_answer_against_reference_implementation(plaintext: bytes) -> None:
    expected = reference_seal(KEK1, 1, DEK, IV, plaintext)
    assert sealed_with_material(KEY1, plaintext) == expected
    assert sealed_with_material(KEY1, plaintext, step=7) == expected
    assert open_bytes(RING1, expected) == plaintext


def test_frozen_vector() -> None:
    # Guards against the module and the test reference drifting together.
    obj = sealed_with_material(KEY1, b"dicomflow")
    assert obj.hex() == (
        "4131010000003a59ca7de684511f792248b909fba1572884ac759664413a461779d2ac27d0da"
        "f28122856e1cf9a7216a30d111f3997ff04c549d0eecf9922e6f318a841fd8c2ea1ad1377675"
        "ba5e36f9387dc6c4e75c6b83a6128597f882fb"
    )


def test_prefix_layout() -> None:
    sealer = Sealer._with_material(MasterKey(0x01020304, KEK1), DEK, IV)
    prefix = sealer.prefix
    assert len(prefix) == PREFIX_LEN
    assert prefix[0:2] == b"A1"
    assert prefix[2:6] == bytes.fromhex("04030201")
    # The same keystream wraps IV and DEK, so EIV ^ EDEK == IV ^ DEK.
    assert _xor(prefix[6:38], prefix[38:70]) == _xor(IV, DEK)
    assert Sealer(KEY1).prefix[2:6] == bytes.fromhex("01000000")


def test_fresh_material_per_object() -> None:
    a, b = seal(KEY1, b"same"), seal(KEY1, b"same")
    assert a[6:70] != b[6:70]
    assert a[70:] != b[70:]


# --- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 5 * MiB + 3])
def test_round_trip(size: int) -> None:
    plaintext = os.urandom(size)
    obj = seal(KEY1, plaintext)
    assert len(obj) == size + OVERHEAD
    assert open_bytes(RING1, obj) == plaintext


def test_seal_accepts_a_keyring_and_uses_its_current_key() -> None:
    obj = seal(KeyRing(KEY2, [KEY1]), b"payload")
    assert key_id_of(obj) == 2


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_streaming_matches_one_shot(chunk_size: int) -> None:
    plaintext = os.urandom(10_000)
    out = io.BytesIO()
    written = seal_stream(KEY1, io.BytesIO(plaintext), out, chunk_size=chunk_size)
    obj = out.getvalue()
    assert written == len(obj) == len(plaintext) + OVERHEAD

    plain = io.BytesIO()
    assert open_stream(RING1, io.BytesIO(obj), plain, chunk_size=chunk_size) == len(plaintext)
    assert plain.getvalue() == open_bytes(RING1, obj) == plaintext

    # Chunking of the plaintext never changes the bytes produced.
    assert sealed_with_material(KEY1, plaintext, step=chunk_size) == sealed_with_material(
        KEY1, plaintext
    )


def test_large_object_streams() -> None:
    plaintext = os.urandom(5 * MiB + 3)
    out = io.BytesIO()
    seal_stream(KEY1, io.BytesIO(plaintext), out, chunk_size=65536)
    plain = io.BytesIO()
    obj = out.getvalue()
    assert open_stream(RING1, io.BytesIO(obj), plain, size=len(obj)) == len(plaintext)
    assert plain.getvalue() == plaintext


@pytest.mark.parametrize("step", [1, 5, 100])
def test_open_from_non_seekable_short_reads(step: int) -> None:
    plaintext = os.urandom(1000)
    obj = seal(KEY1, plaintext)
    plain = io.BytesIO()
    src = io.BufferedReader(ShortReads(obj, step), buffer_size=1)
    open_stream(RING1, src, plain, chunk_size=64)
    assert plain.getvalue() == plaintext


def test_size_limits_what_is_read() -> None:
    obj = seal(KEY1, b"payload")
    src = io.BytesIO(obj + b"trailing bytes of something else")
    plain = io.BytesIO()
    open_stream(RING1, src, plain, size=len(obj))
    assert plain.getvalue() == b"payload"


def test_key_rotation() -> None:
    obj = seal(KEY1, b"sealed under key 1")
    assert open_bytes(KeyRing(KEY2, [KEY1]), obj) == b"sealed under key 1"


# --- typed errors, in the order the spec checks them ----------------------------------


@pytest.mark.parametrize("length", [0, 1, 69, 70, 85])
def test_truncated(length: int) -> None:
    obj = seal(KEY1, b"")[:length]
    with pytest.raises(TruncatedEnvelope, match="truncated"):
        open_bytes(RING1, obj)


def test_truncated_by_declared_size_without_reading() -> None:
    with pytest.raises(TruncatedEnvelope, match="truncated"):
        open_stream(RING1, io.BytesIO(b""), io.BytesIO(), size=85)


def test_truncation_is_checked_before_version() -> None:
    with pytest.raises(TruncatedEnvelope):
        open_bytes(RING1, b"A2" + bytes(83))


def test_unsupported_version() -> None:
    obj = b"A2" + seal(KEY1, b"payload")[2:]
    with pytest.raises(UnsupportedVersion, match="unsupported version"):
        open_bytes(RING1, obj)


def test_version_is_checked_before_key_id() -> None:
    obj = b"A2" + seal(MasterKey(9, KEK1), b"payload")[2:]
    with pytest.raises(UnsupportedVersion):
        open_bytes(RING1, obj)


def test_unknown_master_key() -> None:
    obj = seal(MasterKey(7, KEK1), b"payload")
    with pytest.raises(UnknownMasterKey, match="unknown master key id 7") as info:
        open_bytes(KeyRing(KEY1, [KEY2]), obj)
    assert info.value.key_id == 7


def test_flipped_key_id_bit_gives_unknown_key() -> None:
    obj = bytearray(seal(KEY1, b"payload"))
    obj[5] ^= 0x80  # id 1 -> 0x80000001
    with pytest.raises(UnknownMasterKey, match=str(0x80000001)):
        open_bytes(RING1, bytes(obj))


def test_flipped_key_id_bit_onto_a_known_id_fails_integrity() -> None:
    obj = bytearray(seal(KEY1, b"payload"))
    obj[2] ^= 0x02  # id 1 -> 3, which the ring knows
    ring = KeyRing(KEY1, [MasterKey(3, KEK2)])
    with pytest.raises(IntegrityError, match="integrity check failed"):
        open_bytes(ring, bytes(obj))


@pytest.mark.parametrize(
    "offset",
    [
        6,  # EIV, first byte
        37,  # EIV, last byte
        38,  # EDEK, first byte
        69,  # EDEK, last byte
        70,  # ciphertext, first byte
        70 + 500,  # ciphertext, middle
        -TAG_LEN,  # tag, first byte
        -1,  # tag, last byte
    ],
)
@pytest.mark.parametrize("bit", [0x01, 0x80])
def test_flipped_bit_fails_integrity(offset: int, bit: int) -> None:
    obj = bytearray(seal(KEY1, os.urandom(1000)))
    obj[offset] ^= bit
    with pytest.raises(IntegrityError, match="integrity check failed"):
        open_bytes(RING1, bytes(obj))


def test_integrity_error_chains_invalid_tag() -> None:
    obj = bytearray(seal(KEY1, b"payload"))
    obj[-1] ^= 1
    with pytest.raises(IntegrityError) as info:
        open_bytes(RING1, bytes(obj))
    assert type(info.value.__cause__).__name__ == "InvalidTag"


@pytest.mark.parametrize("plain_len", [1, 1000])
def test_cut_by_one_byte_fails_integrity(plain_len: int) -> None:
    obj = seal(KEY1, os.urandom(plain_len))
    with pytest.raises(IntegrityError):
        open_bytes(RING1, obj[:-1])


def test_appended_byte_fails_integrity() -> None:
    with pytest.raises(IntegrityError):
        open_bytes(RING1, seal(KEY1, b"payload") + b"\0")


def test_stream_shorter_than_declared_size_fails_integrity() -> None:
    obj = seal(KEY1, os.urandom(1000))
    with pytest.raises(IntegrityError, match="integrity check failed"):
        open_stream(RING1, io.BytesIO(obj[:-10]), io.BytesIO(), size=len(obj))


def test_wrong_key_with_same_id_fails_integrity() -> None:
    obj = seal(KEY1, b"payload")
    with pytest.raises(IntegrityError):
        open_bytes(KeyRing(MasterKey(1, KEK2)), obj)


def test_error_messages_hold_no_key_material() -> None:
    obj = bytearray(sealed_with_material(KEY1, b"payload"))
    obj[-1] ^= 1
    with pytest.raises(IntegrityError) as info:
        open_bytes(RING1, bytes(obj))
    text = str(info.value).lower()
    for secret in (KEK1, DEK, IV):
        assert secret.hex() not in text
        assert repr(secret) not in text


# --- key_id_of ----------------------------------------------------------------------


def test_key_id_of() -> None:
    obj = seal(MasterKey(4_000_000_000, KEK1), b"payload")
    assert key_id_of(obj[:PREFIX_LEN]) == 4_000_000_000
    assert key_id_of(obj) == 4_000_000_000
    with pytest.raises(TruncatedEnvelope):
        key_id_of(obj[:69])
    with pytest.raises(UnsupportedVersion):
        key_id_of(b"A2" + obj[2:PREFIX_LEN])


# --- open_to_path -------------------------------------------------------------------


def test_open_to_path_writes_private_file(tmp_path: Path) -> None:
    plaintext = os.urandom(3000)
    obj = seal(KEY1, plaintext)
    out = tmp_path / "out.dcm"
    written = open_to_path(RING1, io.BytesIO(obj), len(obj), out, chunk_size=100)
    assert written == len(plaintext)
    assert out.read_bytes() == plaintext
    assert out.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm"]


@pytest.mark.parametrize("existing", [False, True])
def test_open_to_path_leaves_nothing_after_integrity_failure(
    tmp_path: Path, existing: bool
) -> None:
    obj = bytearray(seal(KEY1, os.urandom(3000)))
    obj[-1] ^= 1
    out = tmp_path / "out.dcm"
    if existing:
        out.write_bytes(b"previous content")
    with pytest.raises(IntegrityError):
        # Small chunks: plenty of plaintext reaches the temp file before the tag check.
        open_to_path(RING1, io.BytesIO(bytes(obj)), None, out, chunk_size=100)
    if existing:
        assert out.read_bytes() == b"previous content"
        assert [p.name for p in tmp_path.iterdir()] == ["out.dcm"]
    else:
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "obj",
    [b"", b"A2" + bytes(100), seal(MasterKey(5, KEK1), b"payload")],
    ids=["truncated", "version", "unknown-key"],
)
def test_open_to_path_leaves_nothing_after_header_failure(tmp_path: Path, obj: bytes) -> None:
    out = tmp_path / "out.dcm"
    with pytest.raises((TruncatedEnvelope, UnsupportedVersion, UnknownMasterKey)):
        open_to_path(RING1, io.BytesIO(obj), None, out)
    assert list(tmp_path.iterdir()) == []
