"""Removes orphaned blobs from the blob bucket.

A blob is needed exactly while a message in INGEST, SEALED or the DLQ names it. Every
way a blob can outlive its message is a crash at a point where no step can both finish
its work and delete it atomically: a publisher that died after writing the blob and
before publishing its message, a consumer that died after acking and before deleting,
or a put that died half-way (chunks without metadata). So instead of trying to make
those steps atomic, a sweep finds blobs that no message names and that are older than a
grace period (longer than any put-then-publish takes), and deletes them. Every stage
that consumes blobs sweeps at start-up and then periodically; sweeps are idempotent,
so replicas sweeping at once is harmless.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from datetime import UTC, datetime

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from dicomflow.shared import subjects
from dicomflow.shared.consumer import Consumer
from dicomflow.shared.messages import H_BLOB
from dicomflow.shared.settings import NatsSettings

log = logging.getLogger(__name__)

BLOB_STREAM = f"OBJ_{subjects.BLOB_BUCKET}"
CHUNKS = f"$O.{subjects.BLOB_BUCKET}.C.>"
REFERRING_STREAMS = (subjects.INGEST_STREAM, subjects.SEALED_STREAM, subjects.DLQ_STREAM)


async def sweep(js: JetStreamContext, grace: float) -> int:
    """Delete orphaned blobs older than ``grace`` seconds; return how many were removed."""
    referenced = await _referenced(js)
    store = await js.object_store(subjects.BLOB_BUCKET)
    try:
        infos = await store.list(ignore_deletes=True)
    except NotFoundError:
        infos = []
    removed = 0
    live_nuids = set()
    for info in infos:
        live_nuids.add(info.nuid)
        if info.name in referenced or await _meta_age(js, info.name or "") < grace:
            continue
        with contextlib.suppress(NotFoundError):
            await store.delete(info.name)
            removed += 1
    removed += await _purge_headless_chunks(js, live_nuids, grace)
    if removed:
        log.info("blob sweep removed %d orphaned blob(s)", removed)
    return removed


async def _referenced(js: JetStreamContext) -> set[str]:
    names: set[str] = set()
    for stream in REFERRING_STREAMS:
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


async def _meta_age(js: JetStreamContext, name: str) -> float:
    """Seconds since the server stored the blob's metadata, which a put writes last.

    (The ``mtime`` inside the metadata is taken when a put starts, so for a large blob
    it can be far older than the moment the blob became complete.)
    """
    encoded = base64.urlsafe_b64encode(name.encode()).decode()
    try:
        meta = await js.get_last_msg(BLOB_STREAM, f"$O.{subjects.BLOB_BUCKET}.M.{encoded}")
    except NotFoundError:
        return float("inf")
    return _age(meta.time.isoformat() if meta.time else None)


async def _purge_headless_chunks(js: JetStreamContext, live_nuids: set[str], grace: float) -> int:
    """Chunks of a put that died before writing its metadata are invisible to ``list``."""
    info = await js.stream_info(BLOB_STREAM, subjects_filter=CHUNKS)
    removed = 0
    for subject in info.state.subjects or {}:
        nuid = subject.rsplit(".", 1)[-1]
        if nuid in live_nuids:
            continue
        try:
            last = await js.get_last_msg(BLOB_STREAM, subject)
        except NotFoundError:
            continue
        if last.time is not None and _age(last.time.isoformat()) < grace:
            continue  # a put still in progress
        await js.purge_stream(BLOB_STREAM, subject=subject)
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
    js: JetStreamContext, interval: float, grace: float, stop: asyncio.Event
) -> None:
    """Sweep now and every ``interval`` seconds until ``stop``; failures are retried."""
    while not stop.is_set():
        try:
            await sweep(js, grace)
        except (NatsError, TimeoutError) as exc:
            log.warning("blob sweep failed, will retry: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def consume_and_sweep(
    js: JetStreamContext, consumer: Consumer, nats: NatsSettings, stop: asyncio.Event
) -> None:
    """Run a consumer stage whose bodies may arrive as blobs, sweeping orphans beside it."""
    await asyncio.gather(
        consumer.run(stop),
        run_periodically(js, nats.blob_sweep_interval, nats.blob_orphan_grace, stop),
    )
