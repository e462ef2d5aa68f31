"""Objects of every size, through every stage, in constant memory; crashes mid-object.

Sizes straddle the inline limit (the server's max_payload less header room: bodies
above it travel through the chunked blob bucket) and the multipart threshold of the
store, up to 300 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.nats.transport import HEADER_ROOM

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, dataset_bytes, of_total_size, with_pixel_bytes
from support.pipeline import Pipeline
from support.servers import MotoServer, wait_for

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
INLINE_LIMIT = MiB - HEADER_ROOM  # nats-server's default max_payload is 1 MiB
SWEEP = {"nats": {"blob_orphan_grace": 2.0, "blob_sweep_interval": 1.0}}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _blob_state(url: str) -> tuple[int, int, int]:
    """(live blobs, chunk subjects, INGEST+SEALED messages), over both blob buckets."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        live = chunks = 0
        for bucket in subjects.BLOB_BUCKETS:
            store = await js.object_store(bucket)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                live += len(await store.list(ignore_deletes=True))
            info = await js.stream_info(
                subjects.blob_stream(bucket), subjects_filter=subjects.blob_chunks(bucket)
            )
            chunks += len(info.state.subjects or {})
        pending = 0
        for stream in (subjects.INGEST_STREAM, subjects.SEALED_STREAM):
            pending += (await js.stream_info(stream)).state.messages
        return live, chunks, pending
    finally:
        await nc.close()


def _wait_no_blobs(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (state := asyncio.run(_blob_state(url))) != (0, 0, 0):
        if time.monotonic() > deadline:
            raise AssertionError(f"blobs left behind (live, chunk subjects, pending): {state}")
        time.sleep(0.5)


def _check_all_back(pipeline: Pipeline, files: list[Made], tmp_path: Path) -> None:
    stored = pipeline.wait_stored(len(files), timeout=300)
    assert set(stored) == {f.sop_instance_uid for f in files}
    for f in files:
        out = tmp_path / f"back-{f.sop_instance_uid}.dcm"
        got = pipeline.cli("get", f.sop_instance_uid, "-o", str(out))
        assert got.returncode == 0, got.stderr
        assert _sha(dataset_bytes(out)) == _sha(dataset_bytes(f.path))
        out.unlink()


def test_every_size_arrives_byte_identical_in_s3(
    tmp_path: Path, nats_server: NatsServer, moto: MotoServer
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    files = [
        with_pixel_bytes(folder / "empty.dcm", 0, seed=1),
        with_pixel_bytes(folder / "mib-1.dcm", MiB - 1, seed=2),
        with_pixel_bytes(folder / "mib.dcm", MiB, seed=3),
        with_pixel_bytes(folder / "mib+1.dcm", MiB + 1, seed=4),
        of_total_size(folder / "inline-2.dcm", INLINE_LIMIT - 2, seed=5),
        of_total_size(folder / "inline.dcm", INLINE_LIMIT, seed=6),
        of_total_size(folder / "inline+2.dcm", INLINE_LIMIT + 2, seed=7),
        with_pixel_bytes(folder / "64mib.dcm", 64 * MiB, seed=8),
        with_pixel_bytes(folder / "300mib.dcm", 300 * MiB, seed=9),
    ]
    moto.create_bucket("large")
    storage: dict[str, Any] = {
        "backend": "s3",
        "s3_bucket": "large",
        "s3_endpoint": moto.endpoint,
        "s3_allow_http": True,
        "s3_access_key_id": "testing",
        "s3_secret_access_key": "testing",
        "multipart_chunk_size": 8 * MiB,
    }
    pipeline = Pipeline(tmp_path / "p", nats_server, storage, extra=SWEEP).start()
    try:
        sent = pipeline.send(files)
        assert sent.statuses() == ["Success"] * len(files), sent.output
        _check_all_back(pipeline, files, tmp_path)
        pipeline.wait_drained()
        _wait_no_blobs(nats_server.url)
        assert pipeline.dead_letters() == []
    finally:
        pipeline.stop()


def test_kill9_mid_300mib_object_stores_it_once_and_leaves_no_blob(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    big = with_pixel_bytes(tmp_path / "big.dcm", 300 * MiB, seed=11)
    objects = tmp_path / "objects"
    pipeline = Pipeline(
        tmp_path / "p", nats_server, {"backend": "local", "local_path": objects}, extra=SWEEP
    ).start()
    try:
        assert pipeline.send([big]).statuses() == ["Success"]

        # The encryptor is writing the sealed blob (the blob stream holds more than the
        # plaintext): kill it there. INGEST still holding the message proves it was mid-way.
        wait_for(
            "the sealed blob being written",
            lambda: _blob_bytes(nats_server.url) > 1.3 * big.path.stat().st_size,
            timeout=180,
        )
        pipeline.kill("encryptor")
        assert _stream_messages(nats_server.url, subjects.INGEST_STREAM) == 1
        pipeline.start("encryptor")

        # The store writer has the sealed message and is storing it: kill it too.
        wait_for(
            "the sealed message",
            lambda: _stream_messages(nats_server.url, subjects.SEALED_STREAM) == 1,
            timeout=180,
        )
        time.sleep(0.5)
        pipeline.kill("store-writer")
        assert _stream_messages(nats_server.url, subjects.SEALED_STREAM) == 1
        pipeline.start("store-writer")

        _check_all_back(pipeline, [big], tmp_path)
        assert len([p for p in objects.rglob("*") if p.is_file()]) == 1
        pipeline.wait_drained()
        _wait_no_blobs(nats_server.url)
        assert pipeline.dead_letters() == []
    finally:
        pipeline.stop()


def _blob_bytes(url: str) -> int:
    return sum(_stream_bytes(url, subjects.blob_stream(b)) for b in subjects.BLOB_BUCKETS)


def _stream_bytes(url: str, stream: str) -> int:
    async def read() -> int:
        nc = await nats.connect(url)
        try:
            return int((await nc.jetstream().stream_info(stream)).state.bytes)
        finally:
            await nc.close()

    return asyncio.run(read())


def _stream_messages(url: str, stream: str) -> int:
    async def read() -> int:
        nc = await nats.connect(url)
        try:
            return int((await nc.jetstream().stream_info(stream)).state.messages)
        finally:
            await nc.close()

    return asyncio.run(read())
