"""Reading stored instances back: shared by `ls`, `get` and `verify`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomflow.shared.crypto import keycheck
from dicomflow.shared.crypto.keyload import load_keyring
from dicomflow.shared.crypto.keyring import KeyRing
from dicomflow.shared.errors import StoreError
from dicomflow.shared.nats import natsconn
from dicomflow.shared.settings import ReaderSettings
from dicomflow.shared.storage import objectstore
from dicomflow.shared.storage.index import Index, Record, State
from dicomflow.shared.storage.objectstore import ObjectStore
from dicomflow.shared.storage.retrieval import fetch_verified


@dataclass
class Reader:
    index: Index
    store: ObjectStore
    keyring: KeyRing | None

    async def record(self, sop_instance_uid: str) -> Record:
        found = await self.index.get(sop_instance_uid)
        if found is None or found[0].state is not State.STORED:
            raise StoreError(f"no stored instance with SOP Instance UID {sop_instance_uid}")
        return found[0]

    async def fetch(self, record: Record, out: Path) -> None:
        """Download, verify the tag, check the digest, then atomically create ``out``."""
        if self.keyring is None:
            raise StoreError("no master key configured: cannot decrypt")
        await fetch_verified(
            self.store, self.keyring, object_key=record.object_key, sha256=record.sha256, out=out
        )


@asynccontextmanager
async def open_reader(settings: ReaderSettings, *, decrypt: bool = True) -> AsyncIterator[Reader]:
    keyring = load_keyring(settings.encryption) if decrypt else None
    store = objectstore.build_store(settings.storage)
    nc = await natsconn.connect_once(settings.nats, "cli")
    try:
        if keyring is not None:  # a wrong key file is refused before anything is read
            await keycheck.check(nc.jetstream(), keyring, record=False)
        yield Reader(await Index.open(nc.jetstream()), store, keyring)
    finally:
        await nc.close()
