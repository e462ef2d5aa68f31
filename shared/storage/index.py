"""The index of stored instances: a JetStream key-value bucket keyed by SOP Instance UID.

A record is written ``pending`` before the object is written and ``stored`` after, so
a store writer that crashed in between knows, on redelivery, that the object at that
name holds a version of the same plaintext and may be written again. Records hold
identities, sizes and digests, never patient data or key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Any

from dicomflow.shared.contracts import subjects
from dicomflow.shared.errors import BrokerUnavailable, StoreError
from dicomflow.shared.nats.errormap import nats_errors
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

_LISTING_STALL = 30.0  # seconds without a message before a listing is declared stalled
_REMOVED = ("DEL", "PURGE")


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
        """Parse a record, checking every field's type (a record may have been written
        by someone else than a store writer): StoreError when it is off."""
        try:
            data = _typed(json.loads(raw))
            data["state"] = State(data["state"])
            return cls(**data)
        except (ValueError, TypeError, KeyError) as exc:
            raise StoreError(f"index record is malformed: {exc}") from exc

    def stored(self, at: str) -> Record:
        return replace(self, state=State.STORED, stored_at=at)


_FIELD_TYPES: dict[str, type] = {
    f.name: int if f.type in ("int", int) else str for f in fields(Record)
}


def _typed(data: object) -> dict[str, Any]:
    """``data`` if it is an object whose known fields have their Record types."""
    if not isinstance(data, dict):
        raise TypeError("not a JSON object")
    for name, kind in _FIELD_TYPES.items():
        value = data.get(name, kind())
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"field {name} is not {kind.__name__}")
    return data


@dataclass(frozen=True, slots=True)
class Malformed:
    """A key whose record could not be read as a Record (``problem`` says why)."""

    key: str
    problem: str


class Conflict(Exception):
    """Someone else wrote the key first; re-read and decide again."""


class Index:
    def __init__(self, kv: KeyValue, js: JetStreamContext) -> None:
        self._kv = kv
        self._js = js

    @classmethod
    async def open(cls, js: JetStreamContext) -> Index:
        return cls(await js.key_value(subjects.INDEX_BUCKET), js)

    async def get(self, key: str) -> tuple[Record, int] | None:
        try:
            with nats_errors("index read failed"):
                entry = await self._kv.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if entry.value is None or entry.revision is None:
            return None
        return Record.from_json(entry.value), entry.revision

    async def create(self, key: str, record: Record) -> int:
        try:
            with nats_errors("index write failed"):
                try:
                    return await self._kv.create(key, record.to_json())
                except NatsError as exc:
                    if "wrong last sequence" in str(exc):
                        raise Conflict from exc
                    raise
        except KeyWrongLastSequenceError as exc:
            raise Conflict from exc

    async def update(self, key: str, record: Record, revision: int) -> int:
        try:
            with nats_errors("index write failed"):
                return await self._kv.update(key, record.to_json(), last=revision)
        except KeyWrongLastSequenceError as exc:
            raise Conflict from exc

    async def keys(self) -> list[str]:
        """Every live key, in order.

        Not nats-py's ``KeyValue.keys``: it decides that a bucket is empty when a consumer
        it has just created reports nothing pending, which a clustered server may report
        before the consumer has counted (a fault run listed 0 of 995 records after a node
        restart). Here emptiness comes from the stream's own state, and otherwise the
        listing ends on the message that leaves nothing pending, or fails loudly.
        """
        stream = f"KV_{subjects.INDEX_BUCKET}"
        prefix = f"$KV.{subjects.INDEX_BUCKET}."
        with nats_errors("index listing failed"):
            info = await self._js.stream_info(stream)
            if not info.state.messages:
                return []
            queue: asyncio.Queue[Msg] = asyncio.Queue()

            async def collect(msg: Msg) -> None:
                await queue.put(msg)

            sub = await self._js.subscribe(
                f"{prefix}>",
                stream=stream,
                cb=collect,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                headers_only=True,
                inactive_threshold=60.0,
            )
        keys: list[str] = []
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), _LISTING_STALL)
                except TimeoutError:
                    raise BrokerUnavailable(
                        f"index listing stalled after {len(keys)} keys: no message for "
                        f"{_LISTING_STALL:.0f} s although the bucket holds "
                        f"{info.state.messages} messages"
                    ) from None
                operation = (msg.headers or {}).get("KV-Operation", "")
                if operation not in _REMOVED and not (msg.headers or {}).get("Nats-Marker-Reason"):
                    keys.append(msg.subject[len(prefix) :])
                if msg.metadata.num_pending == 0:
                    return sorted(keys)
        finally:
            with contextlib.suppress(NatsError):  # else it expires (inactive_threshold)
                await sub.unsubscribe()

    async def entries(self) -> AsyncIterator[Record | Malformed]:
        """Every record, and a ``Malformed`` in place of each one that is not readable:
        one bad record does not stop a listing."""
        for key in await self.keys():
            try:
                found = await self.get(key)
            except StoreError as exc:
                yield Malformed(key, str(exc))
                continue
            if found is not None:
                yield found[0]

    async def records(self) -> AsyncIterator[Record]:
        """Every readable record; malformed ones are skipped with a warning (their count,
        not their keys, which are SOP Instance UIDs)."""
        skipped = 0
        async for entry in self.entries():
            if isinstance(entry, Malformed):
                skipped += 1
            else:
                yield entry
        if skipped:
            log.warning("skipped %d malformed index record(s); `dicomflow ls` names them", skipped)
