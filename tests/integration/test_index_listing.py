"""The index lists its live keys on a real nats-server, whatever the bucket holds."""

from __future__ import annotations

import nats
import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.storage.index import Index

from dicomflow.embedded.natsserver import NatsServer

pytestmark = pytest.mark.integration


async def test_lists_every_live_key_and_none_that_was_removed(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket=subjects.INDEX_BUCKET, history=1)
        index = await Index.open(js)
        assert await index.keys() == []

        uids = [f"1.2.826.0.1.{i}" for i in range(600)]
        for uid in uids:
            await kv.put(uid, b"{}")
        for uid in uids[:7]:
            await kv.delete(uid)
        await kv.purge(uids[7])
        await kv.put(uids[8], b"{} again")  # a second revision is one key, listed once

        assert await index.keys() == sorted(uids[8:])
    finally:
        await nc.close()


async def test_an_emptied_bucket_lists_nothing(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        kv = await js.create_key_value(bucket=subjects.INDEX_BUCKET, history=1)
        await kv.put("1.2.3", b"{}")
        await kv.delete("1.2.3")  # the stream still holds the delete marker
        assert await (await Index.open(js)).keys() == []
    finally:
        await nc.close()
