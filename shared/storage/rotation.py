"""Key rotation at rest: which master key protects each object, and re-encryption.

The truth is the object itself: its A1 prefix carries the key id (``envelope``), read
with one ranged GET of 70 bytes. The index's ``key_id`` is what the store writer
recorded and is brought in line here when it differs.

Re-encrypting one object (``Rotator.rekey``):

1. read the index record and its revision; read the object's prefix: already under
   the target key means nothing to do (only the index is corrected if it lags);
2. download the object to a private temporary file, then in one streaming pass open
   it with the key ring and seal the plaintext under the current key into a second
   private file; the old tag must verify (``IntegrityError`` otherwise) and the
   plaintext must have the index's SHA-256;
3. open the new envelope again and check the SHA-256 once more;
4. only then overwrite the object (the name does not change) and update the index
   record with a revision check.

Each object is rewritten whole or not at all, so a run killed at any point leaves
every object readable; a re-run skips what is done and finishes the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import IO

from dicomflow.shared.crypto import envelope
from dicomflow.shared.crypto.keyring import KeyRing
from dicomflow.shared.errors import EnvelopeError, ProcessingError, StoreError
from dicomflow.shared.settings import StorageSettings
from dicomflow.shared.storage import objectstore, retrieval
from dicomflow.shared.storage.index import Conflict, Index, Record, State
from dicomflow.shared.storage.objectstore import ObjectStore

_CHUNK = 1024 * 1024


class Outcome(StrEnum):
    REKEYED = "rekeyed"
    ALREADY = "already"
    WOULD_REKEY = "would-rekey"


@dataclass
class Tally:
    counts: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        keys = ("rekeyed", "already", "would-rekey", "failed", "pending")
        return {k: self.counts[k] for k in keys}


async def key_id_at_rest(store: ObjectStore, key: str) -> int:
    """The master-key id in the object's A1 prefix (one 70-byte ranged GET)."""
    try:
        prefix = await objectstore.read_range(store, key, 0, envelope.PREFIX_LEN)
    except FileNotFoundError as exc:
        raise StoreError(f"object {key} of the index is missing from storage") from exc
    return envelope.key_id_of(prefix)


async def key_status(index: Index, store: ObjectStore) -> tuple[Counter[int], Tally]:
    """How many stored objects each key id protects, read from the objects themselves."""
    by_key: Counter[int] = Counter()
    tally = Tally()
    async for record in index.records():
        if record.state is not State.STORED:
            tally.counts["pending"] += 1
            continue
        try:
            by_key[await key_id_at_rest(store, record.object_key)] += 1
        except (EnvelopeError, StoreError) as exc:
            tally.counts["failed"] += 1
            tally.failures.append((record.sop_instance_uid, str(exc)))
    return by_key, tally


class Rotator:
    def __init__(
        self,
        index: Index,
        store: ObjectStore,
        keyring: KeyRing,
        settings: StorageSettings,
        scratch: Path | None = None,
    ) -> None:
        self._index = index
        self._store = store
        self._keyring = keyring
        self._settings = settings
        self._scratch = scratch

    @property
    def target(self) -> int:
        return self._keyring.current.key_id

    async def run(self, *, dry_run: bool, progress: Callable[[Tally, int, int], None]) -> Tally:
        tally = Tally()
        keys = await self._index.keys()
        for done, uid in enumerate(keys, start=1):
            try:
                outcome = await self.rekey(uid, dry_run=dry_run)
            except (EnvelopeError, StoreError, ProcessingError) as exc:
                tally.counts["failed"] += 1
                tally.failures.append((uid, str(exc)))
            else:
                if outcome is not None:
                    tally.counts[outcome.value] += 1
                else:
                    tally.counts["pending"] += 1
            progress(tally, done, len(keys))
        return tally

    async def rekey(self, uid: str, *, dry_run: bool) -> Outcome | None:
        """Re-encrypt one instance under the current key; None if it is not stored yet."""
        found = await self._index.get(uid)
        if found is None or found[0].state is not State.STORED:
            return None
        record, revision = found
        if await key_id_at_rest(self._store, record.object_key) == self.target:
            if record.key_id != self.target and not dry_run:
                # A run was killed between writing the object and updating the index.
                await self._update_index(uid, record, revision, record.sealed_size)
            return Outcome.ALREADY
        if dry_run:
            return Outcome.WOULD_REKEY
        with (
            tempfile.TemporaryFile(dir=self._scratch) as old,
            tempfile.TemporaryFile(dir=self._scratch) as new,
        ):
            await retrieval.download(self._store, record.object_key, old)
            size = await asyncio.to_thread(self._reseal, old, new, record)
            current = await self._index.get(uid)
            if current is None or current[1] != revision:
                raise StoreError("the index record changed during re-encryption; run rekey again")
            new.seek(0)
            await objectstore.put(
                self._store,
                record.object_key,
                new,
                size=size,
                create=False,
                settings=self._settings,
            )
        await self._update_index(uid, record, revision, size)
        return Outcome.REKEYED

    def _reseal(self, old: IO[bytes], new: IO[bytes], record: Record) -> int:
        """Open ``old`` and seal its plaintext into ``new``; verify both; return new size."""
        old_size = old.tell()
        old.seek(0)
        sealer = envelope.Sealer(self._keyring.current)
        sink = _Resealing(sealer, new)
        new.write(sealer.prefix)
        envelope.open_stream(self._keyring, old, sink, size=old_size)  # type: ignore[arg-type]
        new.write(sealer.finalize())
        if sink.digest.hexdigest() != record.sha256:
            raise StoreError("decrypted object does not match the SHA-256 in the index")
        size = new.tell()
        new.seek(0)
        check = _Hashing()
        envelope.open_stream(self._keyring, new, check, size=size)  # type: ignore[arg-type]
        if check.digest.hexdigest() != record.sha256:
            raise StoreError("the re-encrypted object does not decrypt to the indexed SHA-256")
        return size

    async def _update_index(self, uid: str, record: Record, revision: int, size: int) -> None:
        updated = replace(record, key_id=self.target, sealed_size=size)
        while True:
            try:
                await self._index.update(uid, updated, revision)
            except Conflict:
                found = await self._index.get(uid)
                if found is None or found[0].sha256 != record.sha256:
                    raise StoreError(
                        "the index record changed during re-encryption; run rekey again"
                    ) from None
                updated = replace(found[0], key_id=self.target, sealed_size=size)
                revision = found[1]
            else:
                return


class _Hashing:
    """A write-only sink that keeps the SHA-256 of what it is given."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return len(data)


class _Resealing(_Hashing):
    """Plaintext in, new ciphertext out to a private file (released only after the old
    tag verifies, because the caller writes the file back only then)."""

    def __init__(self, sealer: envelope.Sealer, out: IO[bytes]) -> None:
        super().__init__()
        self._sealer = sealer
        self._out = out

    def write(self, data: bytes) -> int:
        super().write(data)
        self._out.write(self._sealer.update(bytes(data)))
        return len(data)
