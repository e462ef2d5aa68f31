"""Object storage through ``obstore``: building the store, and the few operations we use.

The same code runs against a local folder, S3, Azure Blob, Google Cloud Storage (see
``backends``), or obstore's ``MemoryStore`` in unit tests. Every failure of the backend
becomes ``StorageUnavailable`` (an outage, ridden out by the consumer) through the
storage edge's one table (``errormap``), except "not found" and "already exists", which
callers decide on.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator
from typing import IO, TYPE_CHECKING, Literal

import obstore
from dicomflow.shared.errors import StorageUnavailable
from dicomflow.shared.settings import StorageSettings
from dicomflow.shared.storage import backends, localfiles
from dicomflow.shared.storage.errormap import storage_errors
from dicomflow.shared.telemetry.redact import redact
from obstore.exceptions import AlreadyExistsError
from obstore.store import ObjectStore

if TYPE_CHECKING:
    from obstore import Attributes

CHUNK = 1024 * 1024

__all__ = [
    "ObjectExists",
    "ObjectStore",
    "build_store",
    "exists",
    "make_durable",
    "put",
    "read_chunks",
    "read_range",
    "sha256_of",
    "size_of",
]


def build_store(settings: StorageSettings) -> ObjectStore:
    """The configured store; raises ConfigError naming the missing or bad field."""
    return backends.build(settings)


class ObjectExists(Exception):
    """``put(create=True)`` found an object at the key already."""


async def put(
    store: ObjectStore,
    key: str,
    body: IO[bytes],
    *,
    size: int,
    create: bool,
    settings: StorageSettings,
) -> None:
    """Write ``size`` bytes of ``body`` at ``key``, in constant memory.

    Up to one part size it is one PUT, conditional when ``create`` (If-None-Match on
    S3). Larger objects go up in parts, ``multipart_concurrency`` at a time; a multipart
    upload cannot be conditional, so ``create`` is then checked with a HEAD first. The
    caller (the store writer) holds a ``pending`` index claim on the key, so no other
    writer races it between the check and the upload.

    On the local backend a body that is a file on the store's file system (the store
    writer's spool of a large body) is linked into place rather than copied
    (``localfiles.link_file``), and every object is then made durable
    (``make_durable``): obstore
    writes a local object to a staging file and links it into place without fsync, so
    a power cut after the store writer's ack could leave an index record naming a
    file that never reached the disk.

    A multipart upload is then checked with a HEAD: its size must be ``size``. An
    S3-compatible server killed mid-upload (the fault suite's s3rver) once completed an
    upload from a part it had kept only in part, and acknowledged it; the store writer
    would have recorded a truncated object as stored. A short object raises
    StorageUnavailable, so the write is tried again, over it.
    """
    attributes = _attributes(settings)
    try:
        if await _link_local(settings, key, body, size, create=create):
            return
        with storage_errors("writing object failed"):
            if size <= settings.multipart_chunk_size:
                mode: Literal["create", "overwrite"] = "create" if create else "overwrite"
                await obstore.put_async(store, key, body.read(), mode=mode, attributes=attributes)
                await make_durable(settings, key)
                return
            if create and await exists(store, key):
                raise ObjectExists(key)
            await obstore.put_async(
                store,
                key,
                body,
                use_multipart=True,
                chunk_size=settings.multipart_chunk_size,
                max_concurrency=settings.multipart_concurrency,
                attributes=attributes,
            )
            await _check_size(store, key, size)
            await make_durable(settings, key)
    except AlreadyExistsError as exc:
        raise ObjectExists(key) from exc


async def _check_size(store: ObjectStore, key: str, size: int) -> None:
    try:
        found = (await obstore.head_async(store, key))["size"]
    except FileNotFoundError:
        found = None
    if found != size:
        held = "nothing" if found is None else f"{found} bytes"
        raise StorageUnavailable(
            redact(
                f"the store acknowledged the upload of {key} ({size} bytes) but holds "
                f"{held}; writing it again"
            )
        )


async def _link_local(
    settings: StorageSettings, key: str, body: IO[bytes], size: int, *, create: bool
) -> bool:
    """On the local backend, make ``body`` (a spool file on the same file system) the
    object by linking it into place, fsynced, instead of copying it; False where it
    cannot be (not a local store, not a file, another file system): upload it then."""
    if settings.backend != "local" or settings.local_path is None or isinstance(body, io.BytesIO):
        return False
    with storage_errors("writing object failed"):
        linked = await asyncio.to_thread(
            localfiles.link_file, body, settings.local_path, key, size, create=create
        )
    if linked is localfiles.Linked.EXISTS:
        raise ObjectExists(key)
    if linked is localfiles.Linked.NOT_LINKABLE:
        return False
    await make_durable(settings, key)
    return True


async def make_durable(settings: StorageSettings, key: str) -> None:
    """fsync a local object and the folders above it up to ``local_path`` (a new folder's
    entry is durable only once its parent is synced); other backends are durable when
    they answer. Raises StorageUnavailable if the disk refuses, so the write is retried
    and the message is not acknowledged."""
    if settings.backend != "local" or settings.local_path is None:
        return
    try:
        with storage_errors("making the object durable failed"):
            await asyncio.to_thread(localfiles.fsync_path, settings.local_path, key)
    except FileNotFoundError as exc:  # an answer elsewhere; here the write did not hold
        raise StorageUnavailable(
            redact(f"the object {key} was gone before it could be made durable; writing it again")
        ) from exc


def _attributes(settings: StorageSettings) -> Attributes | None:
    """The storage class applies to S3 only: Azure tiers and GCS classes are set per bucket."""
    if settings.s3_storage_class and settings.backend == "s3":
        return {"Storage-Class": settings.s3_storage_class}
    return None


async def exists(store: ObjectStore, key: str) -> bool:
    try:
        with storage_errors("checking object failed"):
            await obstore.head_async(store, key)
    except FileNotFoundError:
        return False
    return True


async def size_of(store: ObjectStore, key: str) -> int:
    """The object's size; a missing one raises FileNotFoundError."""
    with storage_errors("checking object failed"):
        return int((await obstore.head_async(store, key))["size"])


async def read_chunks(store: ObjectStore, key: str) -> AsyncIterator[bytes]:
    """Stream an object; a missing one raises FileNotFoundError."""
    with storage_errors("reading object failed"):
        result = await obstore.get_async(store, key)
        async for chunk in result.stream(min_chunk_size=CHUNK):
            yield bytes(chunk)


async def sha256_of(store: ObjectStore, key: str) -> str:
    digest = hashlib.sha256()
    async for chunk in read_chunks(store, key):
        digest.update(chunk)
    return digest.hexdigest()


async def read_range(store: ObjectStore, key: str, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` (exclusive) of an object, in one ranged GET.

    A missing object raises FileNotFoundError; an object shorter than ``end`` returns
    what it has.
    """
    with storage_errors("reading object failed"):
        return bytes(await obstore.get_range_async(store, key, start=start, end=end))
