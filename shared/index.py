"""The index of stored instances: a JetStream key-value bucket keyed by SOP Instance UID.

A record is written ``pending`` before the object is written and ``stored`` after, so
a store writer that crashed in between knows, on redelivery, that the object at that
name holds a version of the same plaintext and may be written again. Records hold
identities, sizes and digests, never patient data or key material.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields, replace
from enum import StrEnum

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from dicomflow.shared import subjects
from dicomflow.shared.errors import BrokerUnavailable, StoreError


class State(StrEnum):
    PENDING = "pending"
    STORED = "stored"


@dataclass(frozen=True, slots=True)
class Record:
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    modality: str
    transfer_syntax: str
    calling_ae: str
    called_ae: str
    object_key: str
    size: int
    sealed_size: int
    sha256: str
    key_id: int
    state: State
    stored_at: str = ""
    replaced_sha256: str = ""

    def to_json(self) -> bytes:
        # Not dataclasses.asdict: it deep-copies every field and showed up in profiles.
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Record:
        try:
            data = json.loads(raw)
            data["state"] = State(data["state"])
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"index record is malformed: {exc}") from exc

    def stored(self, at: str) -> Record:
        return replace(self, state=State.STORED, stored_at=at)


class Conflict(Exception):
    """Someone else wrote the key first; re-read and decide again."""


class Index:
    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> Index:
        return cls(await js.key_value(subjects.INDEX_BUCKET))

    async def get(self, key: str) -> tuple[Record, int] | None:
        try:
            entry = await self._kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except NatsError as exc:
            raise BrokerUnavailable(f"index read failed: {exc!r}") from exc
        if entry.value is None or entry.revision is None:
            return None
        return Record.from_json(entry.value), entry.revision

    async def create(self, key: str, record: Record) -> int:
        try:
            return await self._kv.create(key, record.to_json())
        except KeyWrongLastSequenceError as exc:
            raise Conflict from exc
        except NatsError as exc:
            if "wrong last sequence" in str(exc):
                raise Conflict from exc
            raise BrokerUnavailable(f"index write failed: {exc!r}") from exc

    async def update(self, key: str, record: Record, revision: int) -> int:
        try:
            return await self._kv.update(key, record.to_json(), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise Conflict from exc
        except NatsError as exc:
            raise BrokerUnavailable(f"index write failed: {exc!r}") from exc

    async def keys(self) -> list[str]:
        try:
            return sorted(await self._kv.keys())
        except NoKeysError:
            return []

    async def records(self) -> AsyncIterator[Record]:
        for key in await self.keys():
            found = await self.get(key)
            if found is not None:
                yield found[0]
