"""Object storage through ``obstore``: building the store, and the few operations we use.

The same code runs against a local folder, an S3 server, or obstore's ``MemoryStore``
in unit tests. Every failure of the backend becomes ``StorageUnavailable`` (retried by
the consumer), except "not found" and "already exists", which callers decide on.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import IO, Literal

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError
from obstore.store import LocalStore, ObjectStore, S3Store

from dicomflow.shared.errors import ConfigError, StorageUnavailable
from dicomflow.shared.settings import StorageBackend, StorageSettings

CHUNK = 1024 * 1024

__all__ = [
    "ObjectExists",
    "ObjectStore",
    "build_store",
    "exists",
    "put",
    "read_chunks",
    "sha256_of",
]


def build_store(settings: StorageSettings) -> ObjectStore:
    """The configured store; raises ConfigError naming the missing or bad field."""
    retry = {
        "max_retries": settings.max_retries,
        "retry_timeout": timedelta(seconds=settings.request_timeout * 2),
        "backoff": {
            "init_backoff": timedelta(milliseconds=100),
            "max_backoff": timedelta(seconds=5),
            "base": 2,
        },
    }
    if settings.backend is StorageBackend.LOCAL:
        if settings.local_path is None:
            raise ConfigError("storage.local_path must be set for the local backend")
        try:
            settings.local_path.mkdir(parents=True, exist_ok=True)
            return LocalStore(settings.local_path, mkdir=True)
        except (OSError, BaseError) as exc:
            raise ConfigError(f"storage.local_path {settings.local_path}: {exc}") from exc
    if not settings.s3_bucket:
        raise ConfigError("storage.s3_bucket must be set for the s3 backend")
    credentials: dict[str, str] = {}
    if settings.s3_access_key_id or settings.s3_secret_access_key:
        if not (settings.s3_access_key_id and settings.s3_secret_access_key):
            raise ConfigError(
                "storage.s3_access_key_id and storage.s3_secret_access_key go together: "
                "set both, or neither to use the default credential chain"
            )
        credentials = {
            "access_key_id": settings.s3_access_key_id,
            "secret_access_key": settings.s3_secret_access_key.get_secret_value(),
        }
    try:
        return S3Store(
            settings.s3_bucket,
            region=settings.s3_region,
            endpoint=settings.s3_endpoint,
            client_options={
                "allow_http": settings.s3_allow_http,
                "timeout": timedelta(seconds=settings.request_timeout),
                "connect_timeout": timedelta(seconds=min(settings.request_timeout, 10.0)),
            },
            retry_config=retry,  # type: ignore[arg-type]
            **credentials,  # type: ignore[arg-type]
        )
    except BaseError as exc:
        raise ConfigError(f"storage: cannot configure S3 store: {exc}") from exc


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
    """
    try:
        if size <= settings.multipart_chunk_size:
            mode: Literal["create", "overwrite"] = "create" if create else "overwrite"
            await obstore.put_async(store, key, body.read(), mode=mode)
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
        )
    except AlreadyExistsError as exc:
        raise ObjectExists(key) from exc
    except (BaseError, OSError) as exc:
        raise StorageUnavailable(f"writing object failed: {type(exc).__name__}: {exc}") from exc


async def exists(store: ObjectStore, key: str) -> bool:
    try:
        await obstore.head_async(store, key)
    except FileNotFoundError:
        return False
    except (BaseError, OSError) as exc:
        raise StorageUnavailable(f"checking object failed: {type(exc).__name__}: {exc}") from exc
    return True


async def read_chunks(store: ObjectStore, key: str) -> AsyncIterator[bytes]:
    """Stream an object; a missing one raises FileNotFoundError."""
    try:
        result = await obstore.get_async(store, key)
        async for chunk in result.stream(min_chunk_size=CHUNK):
            yield bytes(chunk)
    except FileNotFoundError:
        raise
    except (BaseError, OSError) as exc:
        raise StorageUnavailable(f"reading object failed: {type(exc).__name__}: {exc}") from exc


async def sha256_of(store: ObjectStore, key: str) -> str:
    digest = hashlib.sha256()
    async for chunk in read_chunks(store, key):
        digest.update(chunk)
    return digest.hexdigest()
