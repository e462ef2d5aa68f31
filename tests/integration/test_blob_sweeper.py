"""The blob sweeper against a real nats-server: what it keeps and what it removes."""

from __future__ import annotations

import asyncio

import nats
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.contracts.messages import H_BLOB
from dicomflow.shared.nats import blobsweeper, topology
from dicomflow.shared.settings import NatsSettings

from dicomflow.embedded.natsserver import NatsServer
from support.natsusers import put_object

pytestmark = pytest.mark.integration


async def test_sweep_keeps_referenced_and_young_blobs_and_removes_orphans(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await topology.ensure(js, NatsSettings(servers=[nats_server.url]))
        blobs = await js.object_store(subjects.INGEST_BLOB_BUCKET)
        sealed = await js.object_store(subjects.SEALED_BLOB_BUCKET)
        ingest = subjects.INGEST_BLOB_BUCKET
        await put_object(nc, ingest, "ingest.1.2.3.aaaa", b"x" * 300_000, "nuida")  # named below
        await put_object(nc, ingest, "ingest.1.2.4.bbbb", b"y" * 300_000, "nuidb")  # orphan
        await js.publish(
            f"{subjects.INGEST_PREFIX}.A.B", b"", headers={H_BLOB: "ingest.1.2.3.aaaa"}
        )
        # Chunks of a put that died before its metadata: invisible to list().
        await js.publish(f"$O.{subjects.INGEST_BLOB_BUCKET}.C.deadnuid", b"z" * 1000)

        assert await blobsweeper.sweep(js, grace=60) == 0  # everything is young

        await asyncio.sleep(1.2)
        young = "sealed.1.2.5.cccc"
        # orphan too, but younger than the grace
        await put_object(nc, subjects.SEALED_BLOB_BUCKET, young, b"w" * 1000, "nuidc")
        assert await blobsweeper.sweep(js, grace=1.0) == 2

        names = {i.name for i in await blobs.list(ignore_deletes=True)}
        assert names == {"ingest.1.2.3.aaaa"}
        assert {i.name for i in await sealed.list(ignore_deletes=True)} == {young}
        info = await js.stream_info(
            subjects.blob_stream(subjects.INGEST_BLOB_BUCKET),
            subjects_filter=subjects.blob_chunks(subjects.INGEST_BLOB_BUCKET),
        )
        assert not any(s.endswith("deadnuid") for s in info.state.subjects or {})
        assert (await blobs.get("ingest.1.2.3.aaaa")).data == b"x" * 300_000
    finally:
        await nc.close()
