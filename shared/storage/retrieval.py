"""Reading a stored instance back: download its envelope, verify, decrypt.

Used by `get` and `verify`, by the scu-gateway before it sends, and by `rekey`. The
plaintext is released only after the GCM tag verified and its SHA-256 matched the record:
until then it lives in a private scratch file next to the destination, which is renamed
into place (atomically) at the very end.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO

from dicomflow.shared.crypto.envelope import open_bytes, open_stream
from dicomflow.shared.crypto.keyring import KeyRing
from dicomflow.shared.errors import DigestMismatch, ObjectMissing
from dicomflow.shared.storage import objectstore
from dicomflow.shared.storage.objectstore import ObjectStore
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

NOT_ON_RECORD = "object decrypts, but not to the SHA-256 on record"


async def download(store: ObjectStore, key: str, out: IO[bytes]) -> int:
    """Copy the object at ``key`` into ``out``; return its size."""
    size = 0
    try:
        async for chunk in objectstore.read_chunks(store, key):
            out.write(chunk)
            size += len(chunk)
    except FileNotFoundError as exc:
        raise ObjectMissing(f"object {key} is missing from storage") from exc
    return size


class _Hashing:
    """A write-only sink that hashes what passes through to ``out``."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.out.write(data)


def open_checked(
    keyring: KeyRing, sealed: IO[bytes], size: int, out: IO[bytes], sha256: str
) -> int:
    """Decrypt ``size`` bytes of ``sealed`` into ``out`` and check the plaintext digest.

    Raises an EnvelopeError or DigestMismatch; on any error the caller discards ``out``.
    """
    sink = _Hashing(out)
    written = open_stream(keyring, sealed, sink, size=size)  # type: ignore[arg-type]
    if sink.digest.hexdigest() != sha256:
        raise DigestMismatch(NOT_ON_RECORD)
    return written


def open_verified(keyring: KeyRing, sealed: bytes, sha256: str) -> bytes:
    """The plaintext of a sealed object held in memory, released only once the tag
    verified and its SHA-256 matched; for objects small enough to hold twice in memory."""
    plain = open_bytes(keyring, sealed)
    if hashlib.sha256(plain).hexdigest() != sha256:
        raise DigestMismatch(NOT_ON_RECORD)
    return plain


async def fetch_verified(
    store: ObjectStore,
    keyring: KeyRing,
    *,
    object_key: str,
    sha256: str,
    out: Path,
    scratch: Path | None = None,
) -> int:
    """Create ``out`` holding the verified plaintext of ``object_key``; return its size.

    Nothing is created at ``out`` unless the tag verified and the digest matched.
    """
    with tempfile.TemporaryFile(dir=scratch) as sealed:
        size = await download(store, object_key, sealed)
        sealed.seek(0)
        return await asyncio.to_thread(_open_into, keyring, sealed, size, sha256, out)


def _open_into(keyring: KeyRing, sealed: IO[bytes], size: int, sha256: str, out: Path) -> int:
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=".dicomflow-")
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as plain:
            written = open_checked(keyring, sealed, size, plain, sha256)
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written


NOT_THE_INSTANCE = "object decrypts, but to another SOP Instance UID than the one asked for"


async def fetch_unindexed(
    store: ObjectStore,
    keyring: KeyRing,
    *,
    object_key: str,
    sop_instance_uid: str,
    out: Path,
    scratch: Path | None = None,
) -> int:
    """``fetch_verified`` where no index gives the plaintext's SHA-256 (a hybrid edge, whose
    index is in the cloud): the GCM tag proves the object was sealed under this site's
    master key and not altered; the instance it holds must have ``sop_instance_uid``."""
    with tempfile.TemporaryFile(dir=scratch) as sealed:
        size = await download(store, object_key, sealed)
        sealed.seek(0)
        return await asyncio.to_thread(
            _open_into_checked_uid, keyring, sealed, size, sop_instance_uid, out
        )


def _open_into_checked_uid(
    keyring: KeyRing, sealed: IO[bytes], size: int, sop_instance_uid: str, out: Path
) -> int:
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=".dicomflow-")
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as plain:
            written = open_stream(keyring, sealed, plain, size=size)  # type: ignore[arg-type]
        _check_uid(partial, sop_instance_uid)
        partial.replace(out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written


def _check_uid(path: Path, sop_instance_uid: str) -> None:
    try:
        found = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        uid = str(found.get("SOPInstanceUID", ""))
    except (InvalidDicomError, OSError, ValueError):
        uid = ""
    if uid != sop_instance_uid:
        raise DigestMismatch(NOT_THE_INSTANCE)
