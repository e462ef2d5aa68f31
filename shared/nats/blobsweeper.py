"""Removes orphaned blobs from the blob buckets.

A blob is needed exactly while a message names it: an ingest blob while a message in
INGEST or the DLQ does, a sealed blob while one in SEALED or the DLQ does. Every
way a blob can outlive its message is a crash at a point where no step can both finish
its work and delete it atomically: a publisher that died after writing the blob and
before publishing its message, a consumer that died after acking and before deleting,
or a put that died half-way (chunks without metadata). So instead of trying to make
those steps atomic, a sweep finds blobs that no message names and that are older than a
grace period (longer than any put-then-publish takes), and deletes them. The encryptor
sweeps both buckets at start-up and then periodically (its ``StageSpec`` names the
buckets it sweeps: ``shared.stage.spec``): finding references means reading
INGEST and the DLQ (which holds plaintext of dead-lettered ingest messages), which the
encryptor may do and the store writer, a least-privilege user that never sees
plaintext, may not. Sweeps are idempotent, so replicas sweeping at once is harmless.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from datetime import UTC, datetime

from dicomflow.shared.contracts import subjects
from dicomflow.shared.contracts.messages import H_BLOB
from dicomflow.shared.nats import errormap
from dicomflow.shared.nats.transport import purge_blob
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

log = logging.getLogger(__name__)

REFERRING_STREAMS = {
    subjects.INGEST_BLOB_BUCKET: (subjects.INGEST_STREAM, subjects.DLQ_STREAM),
    subjects.SEALED_BLOB_BUCKET: (subjects.SEALED_STREAM, subjects.DLQ_STREAM),
}


async def sweep(
    js: JetStreamContext, grace: float, buckets: tuple[str, ...] = subjects.BLOB_BUCKETS
) -> int:
    """Delete orphaned blobs older than ``grace`` seconds; return how many were removed."""
    removed = 0
    for bucket in buckets:
        removed += await _sweep_bucket(js, bucket, grace)
    if removed:
        log.info("blob sweep removed %d orphaned blob(s)", removed)
    return removed


async def _sweep_bucket(js: JetStreamContext, bucket: str, grace: float) -> int:
    referenced = await _referenced(js, REFERRING_STREAMS[bucket])
    store = await js.object_store(bucket)
    try:
        infos = await store.list(ignore_deletes=True)
    except NotFoundError:
        infos = []
    removed = 0
    live_nuids = set()
    for info in infos:
        live_nuids.add(info.nuid)
        if info.name in referenced or await _meta_age(js, bucket, info.name or "") < grace:
            continue
        with contextlib.suppress(NotFoundError):
            await purge_blob(js, bucket, info.name, info.nuid)
            removed += 1
    removed += await _purge_headless_chunks(js, bucket, live_nuids, grace)
    return removed


async def _referenced(js: JetStreamContext, streams: tuple[str, ...]) -> set[str]:
    names: set[str] = set()
    for stream in streams:
        seq = (await js.stream_info(stream)).state.first_seq
        while True:
            try:
                msg = await js.get_msg(stream, seq, subject=">", next=True)
            except NotFoundError:
                break
            name = (msg.headers or {}).get(H_BLOB)
            if name:
                names.add(name)
            seq = (msg.seq or seq) + 1
    return names


async def _meta_age(js: JetStreamContext, bucket: str, name: str) -> float:
    """Seconds since the server stored the blob's metadata, which a put writes last.

    (The ``mtime`` inside the metadata is taken when a put starts, so for a large blob
    it can be far older than the moment the blob became complete.)
    """
    encoded = base64.urlsafe_b64encode(name.encode()).decode()
    try:
        meta = await js.get_last_msg(subjects.blob_stream(bucket), f"$O.{bucket}.M.{encoded}")
    except NotFoundError:
        return float("inf")
    return _age(meta.time.isoformat() if meta.time else None)


async def _purge_headless_chunks(
    js: JetStreamContext, bucket: str, live_nuids: set[str], grace: float
) -> int:
    """Chunks of a put that died before writing its metadata are invisible to ``list``."""
    stream = subjects.blob_stream(bucket)
    info = await js.stream_info(stream, subjects_filter=subjects.blob_chunks(bucket))
    removed = 0
    for subject in info.state.subjects or {}:
        nuid = subject.rsplit(".", 1)[-1]
        if nuid in live_nuids:
            continue
        try:
            last = await js.get_last_msg(stream, subject)
        except NotFoundError:
            continue
        if last.time is not None and _age(last.time.isoformat()) < grace:
            continue  # a put still in progress
        await js.purge_stream(stream, subject=subject)
        removed += 1
    return removed


def _age(mtime: str | None) -> float:
    if not mtime:
        return float("inf")
    try:
        when = datetime.fromisoformat(mtime.replace("Z", "+00:00"))
    except ValueError:
        return float("inf")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (datetime.now(UTC) - when).total_seconds()


async def run_periodically(
    js: JetStreamContext,
    interval: float,
    grace: float,
    stop: asyncio.Event,
    buckets: tuple[str, ...] = subjects.BLOB_BUCKETS,
) -> None:
    """Sweep now and every ``interval`` seconds until ``stop``; failures are retried."""
    while not stop.is_set():
        try:
            with errormap.nats_errors("blob sweep failed"):
                await sweep(js, grace, buckets)
        except errormap.RETRY_LATER as exc:
            log.warning("%s; will retry", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
