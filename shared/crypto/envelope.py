"""The "A1" envelope of the Orthanc object-storage plugins, byte for byte.

Normative spec: ``docs/encryption-format.md``. Layout::

    "A1" | key_id u32le | EIV (32) | EDEK (32) | AES-256-GCM ciphertext (n) | tag (16)

Everything goes through the streaming ``Cipher(AES, GCM)`` API, never ``AESGCM``: the
one-shot API refuses inputs of 2 GiB or more and would hold whole objects in memory.

Readers check, in this order: truncated, version, key id, tag. Decrypted bytes are only
released after the tag verifies: ``open_to_path`` and ``open_bytes`` guarantee that;
``open_stream`` is the building block and leaves discarding ``dst`` on error to the
caller.

The IV and DEK are as sensitive as the KEK (EIV xor EDEK = IV xor DEK under one KEK, so
one leaked IV or DEK unwraps every DEK). They live only inside this module's locals and
the cipher contexts, and no message ever contains them.
"""

from __future__ import annotations

import os
import struct
import tempfile
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import (
    AEADEncryptionContext,
    Cipher,
    algorithms,
    modes,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey
from dicomflow.shared.errors import IntegrityError, TruncatedEnvelope, UnsupportedVersion

VERSION = b"A1"
KEY_ID_LEN = 4
WRAPPED_LEN = 32  # EIV and EDEK each
PREFIX_LEN = len(VERSION) + KEY_ID_LEN + 2 * WRAPPED_LEN  # 70
TAG_LEN = 16
OVERHEAD = PREFIX_LEN + TAG_LEN  # 86
CHUNK_SIZE = 1024 * 1024

_KEY_ID = struct.Struct("<I")
_EIV_AT = len(VERSION) + KEY_ID_LEN  # 6
_EDEK_AT = _EIV_AT + WRAPPED_LEN  # 38


def _keystream(kek: bytes) -> bytes:
    """KS: the first 32 bytes of AES-256-CTR under the KEK from an all-zero counter."""
    enc = Cipher(algorithms.AES(kek), modes.CTR(bytes(16))).encryptor()
    return enc.update(bytes(WRAPPED_LEN)) + enc.finalize()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _key_of(key: MasterKey | KeyRing) -> MasterKey:
    return key.current if isinstance(key, KeyRing) else key


class Sealer:
    """Seal one object incrementally: write ``prefix``, then each ``update``, then the tag.

    Every instance draws a fresh DEK and IV; reusing a (DEK, IV) pair under GCM would
    break both confidentiality and integrity, so a Sealer seals exactly one object.
    """

    __slots__ = ("_encryptor", "prefix")

    prefix: bytes
    _encryptor: AEADEncryptionContext

    def __init__(self, master_key: MasterKey) -> None:
        self._setup(master_key, os.urandom(WRAPPED_LEN), os.urandom(WRAPPED_LEN))

    @classmethod
    def _with_material(cls, master_key: MasterKey, dek: bytes, iv: bytes) -> Sealer:
        """Build a Sealer from a fixed DEK and IV. For known-answer tests only."""
        sealer = cls.__new__(cls)
        sealer._setup(master_key, dek, iv)
        return sealer

    def _setup(self, master_key: MasterKey, dek: bytes, iv: bytes) -> None:
        if len(dek) != WRAPPED_LEN or len(iv) != WRAPPED_LEN:
            raise ValueError(f"the A1 DEK and IV are {WRAPPED_LEN} bytes each")
        ks = _keystream(master_key.key)
        self.prefix = VERSION + _KEY_ID.pack(master_key.key_id) + _xor(iv, ks) + _xor(dek, ks)
        encryptor = Cipher(algorithms.AES(dek), modes.GCM(iv)).encryptor()
        encryptor.authenticate_additional_data(self.prefix)
        self._encryptor = encryptor

    def update(self, chunk: bytes) -> bytes:
        """Ciphertext for ``chunk`` (GCM adds no padding: same length out as in)."""
        return self._encryptor.update(chunk)

    def finalize(self) -> bytes:
        """The 16-byte tag that ends the object."""
        self._encryptor.finalize()  # GCM: never returns data
        return self._encryptor.tag


def seal_stream(
    key: MasterKey | KeyRing,
    src: BinaryIO,
    dst: BinaryIO,
    chunk_size: int = CHUNK_SIZE,
) -> int:
    """Seal everything ``src`` yields into ``dst`` in constant memory; return bytes written.

    Given a KeyRing, seals under its current key.
    """
    _check_chunk_size(chunk_size)
    sealer = Sealer(_key_of(key))
    dst.write(sealer.prefix)
    written = PREFIX_LEN
    while chunk := src.read(chunk_size):
        dst.write(sealer.update(chunk))
        written += len(chunk)
    dst.write(sealer.finalize())
    return written + TAG_LEN


def seal(key: MasterKey | KeyRing, plaintext: bytes) -> bytes:
    """Seal ``plaintext`` in one call; the result is 86 bytes longer.

    The format allows 0-byte plaintexts, but the Orthanc plugins refuse to read them
    back: callers must not store them. The store layer enforces that; this function
    does not, so the format itself stays fully testable.
    """
    out = BytesIO()
    seal_stream(key, BytesIO(plaintext), out)
    return out.getvalue()


def key_id_of(prefix: bytes) -> int:
    """Master-key id of an object, from (at least) its first 70 bytes.

    Only the prefix is checked: an object of 70 to 85 bytes passes here and fails as
    truncated when opened.
    """
    if len(prefix) < PREFIX_LEN:
        raise TruncatedEnvelope(
            f"truncated A1 object: the prefix is {len(prefix)} bytes, an A1 prefix is {PREFIX_LEN}"
        )
    _check_version(prefix)
    key_id: int = _KEY_ID.unpack_from(prefix, len(VERSION))[0]
    return key_id


def open_stream(
    keyring: KeyRing,
    src: BinaryIO,
    dst: BinaryIO,
    size: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> int:
    """Decrypt one A1 object from ``src`` into ``dst``; return plaintext bytes written.

    ``dst`` receives plaintext BEFORE the tag is checked: the caller must discard
    everything written to ``dst`` if this raises (write to a private temporary file,
    as ``open_to_path`` does).

    ``size`` is the object's length when known (e.g. from a HEAD request): then at most
    ``size`` bytes are read and a short object is rejected without reading it. Without
    ``size`` the object runs to the end of ``src``; ``src`` need not be seekable
    because the last 16 bytes are held back as the tag while streaming.
    """
    _check_chunk_size(chunk_size)
    if size is not None and size < OVERHEAD:
        raise _truncated(size)
    head = _read_up_to(src, OVERHEAD)
    if len(head) < OVERHEAD:
        raise _truncated(len(head))
    prefix, iv, dek = _unwrap(keyring, head)
    decryptor = Cipher(algorithms.AES(dek), modes.GCM(iv)).decryptor()
    decryptor.authenticate_additional_data(prefix)

    # Hold back the last TAG_LEN bytes seen: they are the tag once src runs dry.
    held = head[PREFIX_LEN:]
    remaining = None if size is None else size - OVERHEAD
    written = 0
    while remaining is None or remaining > 0:
        want = chunk_size if remaining is None else min(chunk_size, remaining)
        chunk = src.read(want)
        if not chunk:
            break
        if remaining is not None:
            remaining -= len(chunk)
        buffered = memoryview(held + chunk)
        held = bytes(buffered[-TAG_LEN:])
        dst.write(decryptor.update(buffered[:-TAG_LEN]))
        written += len(buffered) - TAG_LEN
    if remaining:
        raise IntegrityError(
            f"integrity check failed: the object ended {remaining} bytes short of its "
            f"declared size of {size} bytes"
        )
    try:
        decryptor.finalize_with_tag(held)
    except InvalidTag as exc:
        raise _tag_mismatch() from exc
    return written


def _unwrap(keyring: KeyRing, head: bytes) -> tuple[bytes, bytes, bytes]:
    """The prefix of an object starting with ``head``, and its IV and DEK, unwrapped
    under the master key the prefix names."""
    _check_version(head)
    master_key = keyring.find(_KEY_ID.unpack_from(head, len(VERSION))[0])
    prefix = bytes(head[:PREFIX_LEN])
    ks = _keystream(master_key.key)
    return prefix, _xor(prefix[_EIV_AT:_EDEK_AT], ks), _xor(prefix[_EDEK_AT:PREFIX_LEN], ks)


def _tag_mismatch() -> IntegrityError:
    return IntegrityError(
        "integrity check failed: the GCM tag does not verify (the object was altered "
        "or cut short, or it was sealed with a different key under the same id)"
    )


def open_to_path(
    keyring: KeyRing,
    src: BinaryIO,
    size: int | None,
    out_path: Path,
    chunk_size: int = CHUNK_SIZE,
) -> int:
    """Decrypt into ``out_path`` only if the whole object verifies; return plaintext bytes.

    Plaintext goes to a 0o600 temporary file beside ``out_path`` (same directory, so the
    final rename is atomic) and is renamed into place after the tag verifies. On any
    error the temporary file is removed and ``out_path`` is left as it was.
    """
    fd, tmp_name = tempfile.mkstemp(
        dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".partial"
    )
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as tmp_file:
            written = open_stream(keyring, src, tmp_file, size, chunk_size)
            tmp_file.flush()
            os.fsync(tmp_file.fileno())
        tmp.replace(out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def open_bytes(keyring: KeyRing, data: bytes) -> bytes:
    """Decrypt a whole object held in memory; nothing is returned unless the tag verifies.

    One AES-GCM call over the whole body (the same A1 layout ``open_stream`` reads): no
    Python loop over chunks, no copy of each chunk, for the scu-gateway's objects. The
    body is read through a memoryview: a sliced copy is fresh memory, whose page faults
    cost twice the decryption itself (0.45 ms of 0.67 for half a MiB)."""
    if len(data) < OVERHEAD:
        raise _truncated(len(data))
    prefix, iv, dek = _unwrap(keyring, data[:PREFIX_LEN])
    try:
        return AESGCM(dek).decrypt(iv, memoryview(data)[PREFIX_LEN:], prefix)
    except InvalidTag as exc:
        raise _tag_mismatch() from exc


def _check_version(head: bytes) -> None:
    if head[: len(VERSION)] != VERSION:
        raise UnsupportedVersion(
            f"unsupported version: the object starts with 0x{head[: len(VERSION)].hex()}, "
            f"not {VERSION.decode()!r} (is it an A1-encrypted object at all?)"
        )


def _truncated(size: int) -> TruncatedEnvelope:
    return TruncatedEnvelope(
        f"truncated A1 object: {size} bytes, but every A1 object has at least "
        f"{OVERHEAD} bytes ({PREFIX_LEN}-byte prefix and {TAG_LEN}-byte tag)"
    )


def _read_up_to(src: BinaryIO, n: int) -> bytes:
    """Read ``n`` bytes, fewer only at end of stream (raw streams may return short reads)."""
    parts: list[bytes] = []
    missing = n
    while missing > 0:
        part = src.read(missing)
        if not part:
            break
        parts.append(part)
        missing -= len(part)
    return b"".join(parts)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
