"""Reading stored instances back: shared by `ls`, `get` and `verify`."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from dicomflow.shared import natsconn, storage
from dicomflow.shared.envelope import open_to_path
from dicomflow.shared.errors import StoreError
from dicomflow.shared.index import Index, Record, State
from dicomflow.shared.keyring import KeyRing
from dicomflow.shared.settings import ReaderSettings
from dicomflow.shared.storage import ObjectStore


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
        with tempfile.NamedTemporaryFile(
            dir=out.parent, prefix=".dicomflow-", delete=False
        ) as sealed:
            sealed_path = Path(sealed.name)
            try:
                async for chunk in storage.read_chunks(self.store, record.object_key):
                    sealed.write(chunk)
            except FileNotFoundError as exc:
                sealed_path.unlink(missing_ok=True)
                raise StoreError(
                    f"object {record.object_key} of the index is missing from storage"
                ) from exc
        try:
            with sealed_path.open("rb") as src:
                open_to_path(self.keyring, src, sealed_path.stat().st_size, out)
        finally:
            sealed_path.unlink(missing_ok=True)
        if _sha256(out) != record.sha256:
            out.unlink()
            raise StoreError("decrypted object does not match the SHA-256 in the index")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@asynccontextmanager
async def open_reader(settings: ReaderSettings, *, decrypt: bool = True) -> AsyncIterator[Reader]:
    keyring = settings.encryption.keyring() if decrypt else None
    store = storage.build_store(settings.storage)
    nc = await natsconn.connect_once(settings.nats, "cli")
    try:
        yield Reader(await Index.open(nc.jetstream()), store, keyring)
    finally:
        await nc.close()
