"""Moves message bodies between stages: inline, or through the chunked blob bucket.

A body larger than the inline limit (the server's ``max_payload`` less room for
headers) is written to a JetStream object-store bucket in chunks and the message
carries its name. Plaintext (``ingest.`` names) and sealed (``sealed.``) bodies have a
bucket each (``subjects.blob_bucket``), so NATS permissions can separate them. The
consumer of such a message deletes the blob after it has acked the message; a crash
between ack and delete leaves an orphan blob, never a message whose body is gone.

Every put writes a blob of its own: the name is fresh (``blob_name``), the metadata is
published only where none exists yet, and nothing is ever written over an existing
blob. Two attempts at the same message (a re-seal after a lost ack, a modality's
resend) therefore never touch each other's bytes: when JetStream drops the second
attempt's message as a duplicate, the blob that attempt wrote is deleted and the first
message keeps the blob it names. Names carry no identifier of the instance. A blob is
deleted by purging its chunk and metadata subjects, so the blob streams need no
``Nats-Rollup`` headers (a rollup of ``all`` would wipe a whole bucket).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import tempfile
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from dicomflow.shared.contracts import subjects
from dicomflow.shared.contracts.messages import SEALED_BLOB_PREFIX, BodyKind, Instance
from dicomflow.shared.errors import BrokerUnavailable, ContractViolation
from dicomflow.shared.nats.errormap import nats_errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ObjectInfo, ObjectMetaOptions, PubAck
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore
from nats.nuid import NUID

log = logging.getLogger(__name__)

HEADER_ROOM = 16 * 1024
BLOB_CHUNK = 4 * 1024 * 1024
BLOB_WINDOW_BYTES = 16 * 1024 * 1024  # chunk bytes published and not yet acked, at most
BLOB_READ_BYTES = 8 * 1024 * 1024  # chunk bytes asked for in one batched read
SEALED_SPOOL_PREFIX = "dicomflow-sealed-"


class BlobMissing(ContractViolation):
    """The blob a message names does not exist (in a hybrid cloud it may be on its way)."""


class Transport:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        *,
        publish_timeout: float,
        spool_dir: Path | None = None,
        inline_limit: int | None = None,
        purge_failed_puts: bool = True,
    ) -> None:
        self._nc = nc
        self._js = js
        self._timeout = publish_timeout
        self._spool_dir = spool_dir
        self._inline_limit = inline_limit
        # A user without purge rights (the scp-gateway) leaves a failed put's chunks to
        # the blob sweeper instead of asking for a purge it would be refused.
        self._purge_failed_puts = purge_failed_puts
        self._blobs: dict[str, ObjectStore] = {}
        self._nuid = NUID()

    @property
    def inline_limit(self) -> int:
        if self._inline_limit is not None:
            return self._inline_limit
        return max(self._nc.max_payload - HEADER_ROOM, 0)

    @property
    def blob_chunk_size(self) -> int:
        """Chunks of the blob bucket: large (fewer acks to wait for), within max_payload."""
        return max(min(self._nc.max_payload - HEADER_ROOM, BLOB_CHUNK), 64 * 1024)

    async def blobs(self, bucket: str) -> ObjectStore:
        if bucket not in self._blobs:
            self._blobs[bucket] = await self._js.object_store(bucket)
        return self._blobs[bucket]

    async def publish(
        self, subject: str, instance: Instance, body: IO[bytes], size: int, *, blob_prefix: str
    ) -> Instance:
        """Publish ``instance`` with ``size`` bytes from ``body``; return it as sent.

        Raises BrokerUnavailable unless JetStream acknowledged the message.
        """
        if size > self.inline_limit:
            name = blob_name(blob_prefix, instance)
            await self.put_blob(name, _file_chunks(body, self.blob_chunk_size))
            return await self.publish_blob(subject, instance, name)
        sent = instance.with_body(BodyKind.INLINE)
        await self._publish(subject, body.read(), sent)
        return sent

    async def publish_blob(self, subject: str, instance: Instance, name: str) -> Instance:
        """Publish ``instance`` whose body is the blob ``name``, already put by this
        attempt; return it as sent. Raises BrokerUnavailable unless JetStream
        acknowledged the message.

        When JetStream answers that the message is a duplicate (an earlier attempt's
        message, naming its own blob, is the one kept), the blob of this attempt is
        named by nothing and is deleted here.
        """
        sent = instance.with_body(BodyKind.BLOB, name)
        if (await self._publish(subject, b"", sent)).duplicate:
            log.info("message was a duplicate of one already published; its blob is removed")
            await self.delete_blob_named(name)
        return sent

    async def _publish(self, subject: str, data: bytes, sent: Instance) -> PubAck:
        with nats_errors("JetStream did not acknowledge the publish"):
            return await self._js.publish(
                subject, data, timeout=self._timeout, headers=sent.headers()
            )

    async def put_blob(self, name: str, body: AsyncIterator[bytes]) -> tuple[int, str]:
        """Write what ``body`` yields as the blob ``name``, in the JetStream object-store
        format; return its size and hex SHA-256. Raises BrokerUnavailable on failure.

        Not ``ObjectStore.put``: it waits for the ack of each chunk before it sends the
        next, so a 2 GiB body took some 2000 sequential round trips. Here up to
        ``BLOB_WINDOW_BYTES`` of chunks are in flight; the metadata message, which is
        what makes the blob exist, is published only once every chunk was acked, as
        ``ObjectStore.put`` does, and only where no metadata of that name exists
        (``Nats-Expected-Last-Subject-Sequence: 0``): an existing blob is never replaced,
        and a name that is taken is an error (names come from ``blob_name``, fresh for
        each put). ``body`` may yield pieces of any size: they are cut into chunks of
        ``blob_chunk_size``, each hashed (for the metadata's digest) in a worker thread.
        On any failure, ``body``'s own included, the chunks written so far are purged
        (where this user may purge); a crash leaves chunks without metadata, which the
        blob sweeper removes.
        """
        with nats_errors("JetStream did not acknowledge the blob"):
            return await self._put_blob(name, body)

    async def _put_blob(self, name: str, body: AsyncIterator[bytes]) -> tuple[int, str]:
        bucket = _bucket_of(name)
        stream = subjects.blob_stream(bucket)
        nuid = self._nuid.next().decode()
        chunk_subject = f"$O.{bucket}.C.{nuid}"
        chunk_size = self.blob_chunk_size
        window = max(BLOB_WINDOW_BYTES // chunk_size, 2)
        digest = hashlib.sha256()
        in_flight: deque[asyncio.Future[PubAck]] = deque()
        size = chunks = 0

        try:
            async for data in _rechunked(body, chunk_size):
                await asyncio.to_thread(digest.update, data)
                while len(in_flight) >= window:
                    await asyncio.wait_for(in_flight.popleft(), self._timeout)
                in_flight.append(await self._js.publish_async(chunk_subject, data))
                size += len(data)
                chunks += 1
            while in_flight:
                await asyncio.wait_for(in_flight.popleft(), self._timeout)
            info = ObjectInfo(
                name=name,
                bucket=bucket,
                nuid=nuid,
                size=size,
                chunks=chunks,
                mtime=datetime.now(UTC).isoformat(),
                digest=f"SHA-256={_b64(digest.digest())}",
                options=ObjectMetaOptions(max_chunk_size=chunk_size),
            )
            await self._js.publish(
                _meta_subject(bucket, name),
                json.dumps(info.as_dict()).encode(),
                timeout=self._timeout,
                headers={"Nats-Expected-Last-Subject-Sequence": "0"},
            )
        except BaseException:
            # Chunks still in flight are let land first: a purge that overtook them would
            # leave them behind.
            with contextlib.suppress(NatsError, TimeoutError):
                await asyncio.wait_for(
                    asyncio.gather(*in_flight, return_exceptions=True), self._timeout
                )
            if self._purge_failed_puts:
                with contextlib.suppress(NatsError, TimeoutError):
                    await self._js.purge_stream(stream, subject=chunk_subject)
            raise
        return size, digest.hexdigest()

    async def open_body(self, msg: Msg, instance: Instance) -> IO[bytes]:
        """The message body as a readable file positioned at 0; the caller closes it."""
        if instance.body is BodyKind.INLINE:
            return io.BytesIO(msg.data)  # shares the bytes: no copy
        body, _ = await self._open_blob(instance)
        return body

    async def open_body_hashed(self, msg: Msg, instance: Instance) -> tuple[IO[bytes], str]:
        """``open_body`` and the hex SHA-256 of exactly the bytes it returns.

        A blob is hashed as it is copied into the private spool file the caller reads,
        so the digest costs no second pass.
        """
        if instance.body is BodyKind.INLINE:
            return io.BytesIO(msg.data), hashlib.sha256(msg.data).hexdigest()
        return await self._open_blob(instance)

    async def _open_blob(self, instance: Instance) -> tuple[IO[bytes], str]:
        spool = self._blob_spool(instance)
        try:
            with nats_errors(f"could not read blob {instance.blob}"):
                digest = await self._read_blob(instance.blob, spool)
                spool.seek(0)
        except NotFoundError as exc:
            spool.close()
            raise BlobMissing(f"blob {instance.blob} named by the message does not exist") from exc
        except BaseException:
            spool.close()
            raise
        return spool, digest

    def _blob_spool(self, instance: Instance) -> IO[bytes]:
        """The private file a blob is copied into. A sealed blob's is named (ciphertext
        only), so that the local storage backend can link it into place as the object
        instead of copying it again (``storage.localfiles``); one a process killed with
        kill -9 left in ``spool_dir`` is removed by ``sweep_sealed_spools``. Plaintext is
        spooled to an anonymous file, which leaves nothing behind."""
        if instance.blob.startswith(f"{SEALED_BLOB_PREFIX}."):
            return tempfile.NamedTemporaryFile(dir=self._spool_dir, prefix=SEALED_SPOOL_PREFIX)
        return tempfile.TemporaryFile(dir=self._spool_dir)

    async def _read_blob(self, name: str, out: IO[bytes]) -> str:
        """Copy a blob into ``out`` chunk by chunk, checking its size and digest; return
        the digest (hex SHA-256).

        Not ``ObjectStore.get``: that reads through an ordered push consumer whose
        flow-control replies nats-py sends from a 250 ms timer, which capped reads at
        about 60 MB/s and made nats-server cache whole blobs. Batched direct gets of the
        chunk subject instead (``_chunks``): one request brings up to
        ``BLOB_READ_BYTES`` of chunks, so memory stays bounded and a 2 GiB blob is not
        some 2000 sequential round trips.
        """
        digest = hashlib.sha256()
        chunks = self._blob_chunks(name, digest)
        async with contextlib.aclosing(chunks):
            async for data in chunks:
                out.write(data)
        return digest.hexdigest()

    async def blob_chunks(self, instance: Instance) -> AsyncGenerator[bytes, None]:
        """The message's blob body, chunk by chunk, in constant memory, for a caller that
        checks the content's SHA-256 itself (against the message's headers).

        Its size is checked against the blob's metadata before the last chunk is
        yielded; a missing blob is a ContractViolation, a failed read BrokerUnavailable.
        """
        chunks = self._blob_chunks(instance.blob, None)
        try:
            with nats_errors(f"could not read blob {instance.blob}"):
                async with contextlib.aclosing(chunks):
                    async for data in chunks:
                        yield data
        except NotFoundError as exc:
            raise BlobMissing(f"blob {instance.blob} named by the message does not exist") from exc

    async def _blob_chunks(
        self, name: str, digest: hashlib._Hash | None
    ) -> AsyncGenerator[bytes, None]:
        """The chunks of blob ``name``; the size, and with ``digest`` the metadata's
        digest, are checked before the last chunk is yielded (BrokerUnavailable: a read
        that came back short or altered is retried)."""
        bucket = _bucket_of(name)
        info = await (await self.blobs(bucket)).get_info(name)
        if info.nuid is None or info.size is None or info.chunks is None:
            raise ContractViolation(f"blob {name} has incomplete metadata")
        size = 0
        held: bytes | None = None  # one chunk behind, so the checks come before the last
        chunks = self._chunks(bucket, f"$O.{bucket}.C.{info.nuid}", info.chunks)
        async with contextlib.aclosing(chunks):
            async for data in chunks:
                if digest is not None:
                    digest.update(data)
                size += len(data)
                if held is not None:
                    yield held
                held = data
        expected = (info.digest or "").split("=", 1)[-1].rstrip("=")
        altered = digest is not None and expected != _b64(digest.digest()).rstrip("=")
        if size != info.size or altered:
            raise BrokerUnavailable(f"blob {name} read back incomplete or altered; retrying")
        if held is not None:
            yield held

    async def _chunks(self, bucket: str, subject: str, count: int) -> AsyncGenerator[bytes, None]:
        """The ``count`` chunks on ``subject``, in order, fetched in batches.

        A batched direct get (``batch`` and ``max_bytes`` in the request, nats-server
        2.11+) answers with the messages, then an end-of-batch status (204); the next
        request starts after the last sequence received.
        """
        stream = subjects.blob_stream(bucket)
        batch = max(BLOB_READ_BYTES // self.blob_chunk_size, 1)
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        try:
            seq, left = 1, count
            while left:
                request = {
                    "seq": seq,
                    "next_by_subj": subject,
                    "batch": min(batch, left),
                    "max_bytes": BLOB_READ_BYTES,
                }
                await self._nc.publish(
                    f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox
                )
                got = 0
                while True:
                    msg = await sub.next_msg(timeout=self._timeout)
                    headers = msg.headers or {}
                    status = headers.get("Status")
                    if status == "204":  # end of this batch
                        break
                    if status is not None:
                        raise (
                            NotFoundError
                            if status == "404"
                            else BrokerUnavailable(
                                f"direct get of blob chunks answered status {status}"
                            )
                        )
                    seq = int(headers.get("Nats-Sequence", "0")) + 1
                    got += 1
                    left -= 1
                    yield msg.data
                    if not left:
                        break
                if not got:
                    raise NotFoundError
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    async def delete_blob(self, instance: Instance) -> None:
        """Best effort: a blob left behind is an orphan, never a loss."""
        if instance.body is BodyKind.BLOB:
            await self.delete_blob_named(instance.blob)

    async def delete_blob_named(self, name: str) -> None:
        """Best effort, as ``delete_blob``."""
        bucket = _bucket_of(name)
        with contextlib.suppress(NotFoundError):
            try:
                with nats_errors("could not delete the blob"):
                    info = await (await self.blobs(bucket)).get_info(name)
                    await purge_blob(self._js, bucket, name, info.nuid)
            except BrokerUnavailable as exc:
                log.warning("%s; the blob sweeper will remove it", exc)


async def purge_blob(js: JetStreamContext, bucket: str, name: str, nuid: str | None) -> None:
    """Delete blob ``name`` (whose chunks are ``nuid``'s) from ``bucket``: its chunks
    first, then its metadata, each by a purge of its subject. Not
    ``ObjectStore.delete``, whose deletion marker is a ``Nats-Rollup`` publish, which
    the blob streams refuse. A crash in between leaves metadata without chunks, named
    by no message: the blob sweeper finds it and purges again."""
    stream = subjects.blob_stream(bucket)
    if nuid:
        await js.purge_stream(stream, subject=f"$O.{bucket}.C.{nuid}")
    await js.purge_stream(stream, subject=_meta_subject(bucket, name))


def sweep_sealed_spools(spool_dir: Path | None) -> int:
    """Remove the sealed spool files (``dicomflow-sealed-*``) in ``spool_dir`` (default:
    the system's temporary folder); return how many. A store-writer calls it as it
    starts. A replica's spool in use keeps its bytes (only the name goes; the object is
    then uploaded instead of linked)."""
    folder = spool_dir or Path(tempfile.gettempdir())
    removed = 0
    for path in folder.glob(f"{SEALED_SPOOL_PREFIX}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def blob_name(prefix: str, instance: Instance) -> str:
    """A fresh name for a blob of ``instance`` under ``prefix`` (``ingest`` or
    ``sealed``): the instance's reference (which binds the blob to it, see
    ``messages._blob``) and a NUID new for every put, so that no attempt ever writes
    over another's blob. It identifies nothing by itself (no SOP Instance UID)."""
    return f"{prefix}.{instance.ref}.{NUID().next().decode()}"


def _meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


async def _file_chunks(body: IO[bytes], size: int) -> AsyncGenerator[bytes, None]:
    """``body`` read ``size`` bytes at a time in a worker thread."""
    while data := await asyncio.to_thread(body.read, size):
        yield data


async def _rechunked(pieces: AsyncIterator[bytes], size: int) -> AsyncGenerator[bytes, None]:
    """What ``pieces`` yields, cut into chunks of ``size`` bytes (the last may be short)."""
    pending = bytearray()
    async for piece in pieces:
        if not pending and len(piece) == size:
            yield piece  # already a chunk: no copy
            continue
        pending += piece
        while len(pending) >= size:
            yield bytes(memoryview(pending)[:size])
            del pending[:size]
    if pending:
        yield bytes(pending)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def _bucket_of(name: str) -> str:
    try:
        return subjects.blob_bucket(name)
    except ValueError as exc:
        raise ContractViolation(str(exc)) from exc
