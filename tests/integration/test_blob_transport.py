"""Blob bodies through a real nats-server: the windowed put writes the object-store
format that nats-py's own object store, and our direct-get reader, read back."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from dataclasses import replace
from typing import IO

import nats
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.contracts.messages import BodyKind, Instance
from dicomflow.shared.errors import BrokerUnavailable
from dicomflow.shared.nats import topology
from dicomflow.shared.nats import transport as transport_module
from dicomflow.shared.nats.transport import Transport
from dicomflow.shared.settings import NatsSettings
from nats.js.client import JetStreamContext

from dicomflow.embedded.natsserver import NatsServer

pytestmark = pytest.mark.integration

CHUNK = 64 * 1024
SUBJECT = subjects.ingest_subject("SCP", "SCU")


def _instance(body: bytes) -> Instance:
    return Instance(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        study_uid="1.2.3",
        series_uid="1.2.3.5",
        calling_ae="SCU",
        called_ae="SCP",
        transfer_syntax="1.2.840.10008.1.2.1",
        size=len(body),
        sha256=hashlib.sha256(body).hexdigest(),
    )


async def _chunk_count(js: JetStreamContext, kind: str = ".C.") -> int:
    """Messages in the ingest blob stream: chunks, or with ``.M.`` blobs' metadata."""
    info = await js.stream_info(
        subjects.blob_stream(subjects.INGEST_BLOB_BUCKET), subjects_filter="$O.>"
    )
    return sum(n for subject, n in (info.state.subjects or {}).items() if kind in subject)


async def _with_transport(url: str, test: object) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await topology.ensure(js, NatsSettings(servers=[url]))
        transport = Transport(nc, js, publish_timeout=5.0, inline_limit=1000)
        await test(js, transport)  # type: ignore[operator]
    finally:
        await nc.close()


def test_windowed_put_reads_back_through_nats_py_and_direct_gets(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Transport, "blob_chunk_size", property(lambda self: CHUNK))
    monkeypatch.setattr(transport_module, "BLOB_WINDOW_BYTES", 3 * CHUNK)
    monkeypatch.setattr(transport_module, "BLOB_READ_BYTES", 4 * CHUNK)
    body = os.urandom(40 * CHUNK + 123)  # many windows of chunks, a short last chunk

    async def test(js: JetStreamContext, transport: Transport) -> None:
        sent = await transport.publish(
            SUBJECT,
            _instance(body),
            io.BytesIO(body),
            len(body),
            blob_prefix="ingest",
        )
        assert sent.body is BodyKind.BLOB
        store = await js.object_store(subjects.INGEST_BLOB_BUCKET)
        info = await store.get_info(sent.blob)
        assert (info.size, info.chunks) == (len(body), 41)
        assert (await store.get(sent.blob)).data == body  # nats-py's reader agrees
        out = io.BytesIO()
        await transport._read_blob(sent.blob, out)  # digest and size checked inside
        assert out.getvalue() == body
        # The same blob again (a retried publish) replaces the old chunks, not adds.
        await transport.publish(
            SUBJECT,
            _instance(body),
            io.BytesIO(body),
            len(body),
            blob_prefix="ingest",
        )
        assert await _chunk_count(js) == 41
        assert (await store.get(sent.blob)).data == body

    asyncio.run(_with_transport(nats_server.url, test))


class _Breaks(io.RawIOBase):
    """A body that fails after ``good`` bytes, as a spool file on a failing disk would."""

    def __init__(self, good: int) -> None:
        self._left = good

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            raise OSError("disk gone")
        n = min(n, self._left)
        self._left -= n
        return b"z" * n


def test_failed_put_leaves_no_chunks_and_no_blob(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Transport, "blob_chunk_size", property(lambda self: CHUNK))
    body = b"z" * (10 * CHUNK)

    async def test(js: JetStreamContext, transport: Transport) -> None:
        broken: IO[bytes] = _Breaks(5 * CHUNK + 7)  # type: ignore[assignment]
        with pytest.raises(BrokerUnavailable):
            await transport.publish(
                SUBJECT,
                _instance(body),
                broken,
                len(body),
                blob_prefix="ingest",
            )
        assert await _chunk_count(js) == 0
        assert await _chunk_count(js, ".M.") == 0  # no blob's metadata either

    asyncio.run(_with_transport(nats_server.url, test))


def test_blobs_written_at_once_read_back_apart(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two puts in parallel interleave their chunks in the stream; each blob's batched
    reads take only its own, across several batches."""
    monkeypatch.setattr(Transport, "blob_chunk_size", property(lambda self: CHUNK))
    monkeypatch.setattr(transport_module, "BLOB_WINDOW_BYTES", 2 * CHUNK)
    monkeypatch.setattr(transport_module, "BLOB_READ_BYTES", 2 * CHUNK)
    first, second = os.urandom(9 * CHUNK + 1), os.urandom(7 * CHUNK)

    async def test(js: JetStreamContext, transport: Transport) -> None:
        def instance(body: bytes, sop: str) -> Instance:
            return replace(_instance(body), sop_instance_uid=sop)

        sent = await asyncio.gather(
            transport.publish(
                SUBJECT,
                instance(first, "1.2.3.4"),
                io.BytesIO(first),
                len(first),
                blob_prefix="ingest",
            ),
            transport.publish(
                SUBJECT,
                instance(second, "1.2.3.5"),
                io.BytesIO(second),
                len(second),
                blob_prefix="ingest",
            ),
        )
        for body, one in zip((first, second), sent, strict=True):
            out = io.BytesIO()
            await transport._read_blob(one.blob, out)
            assert out.getvalue() == body

    asyncio.run(_with_transport(nats_server.url, test))
