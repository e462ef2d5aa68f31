"""The typed seam between the consumer loop and a stage's handler.

The consumer decodes every message it fetches against its stream's contract (a
``Decoder``: ``ingest`` for INGEST, ``sealed`` for SEALED, ``raw`` for streams whose
handler checks its own contract) and hands the stage ``Delivery`` records: the validated
header record (``messages.Instance``), a ``Body`` that hides whether the bytes came
inline or through the blob bucket and checks them against the size and SHA-256 the
headers declare, the attempt number and the delivery's span. A forged or malformed
message never reaches a handler.

A handler takes a batch of deliveries and answers one ``Outcome`` per delivery: done
(with an optional ``after_ack`` step, run once the ack went through: where a consumed
blob is deleted) or failed with an error that ``disposition`` maps to nak or dead
letter. ``one_at_a_time`` and ``concurrently`` turn a handler of one delivery into a
handler of batches (the deliveries in turn, or all at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import IO, Generic, TypeVar

from dicomflow.shared.contracts import messages
from dicomflow.shared.contracts.messages import H_TRACEPARENT, BodyKind, Instance
from dicomflow.shared.crypto.sealsign import SealVerifier
from dicomflow.shared.errors import ContractViolation
from dicomflow.shared.nats.transport import Transport
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import Span

R = TypeVar("R")  # the header record a decoder yields (``Instance`` for INGEST and SEALED)
T = TypeVar("T")

AfterAck = Callable[[], Awaitable[None]]
# Called with the size and hex SHA-256 of a body as read; raises if they are not declared.
BodyCheck = Callable[[int, str], None]

THREAD_HASH_MIN = 64 * 1024  # hash larger pieces in a worker thread (hashlib drops the GIL)


class Body:
    """A message's body, inline or in the blob bucket, checked when read.

    ``read`` (the whole body in memory), ``open`` (a file at offset 0, spooled to disk
    for a blob; the caller closes it), ``apply`` (a function of the whole body, run
    once it was checked) and ``stream`` (pieces in constant memory) each check the
    bytes against the size and digest the headers declare and raise the stream's error
    if they differ: ``stream`` does so before it yields the last piece, so nothing
    built from a mismatching body is ever complete. A missing blob raises
    ``BlobMissing``, a failed read ``BrokerUnavailable`` (an outage: ridden out).
    """

    __slots__ = ("_check", "_data", "_instance", "_message", "_transport", "failed_check")

    def __init__(
        self,
        message: Msg,
        instance: Instance | None = None,
        transport: Transport | None = None,
        check: BodyCheck | None = None,
    ) -> None:
        self._message = message
        self._data = message.data
        self._instance = instance
        self._transport = transport
        self._check = check
        self.failed_check = False  # set once a read found bytes other than declared

    @property
    def kind(self) -> BodyKind:
        if self._instance is None:
            return BodyKind.INLINE
        return self._instance.body

    async def read(self) -> bytes:
        """The whole body, checked."""
        if self.kind is BodyKind.INLINE:
            return await self.apply(_same)
        with await self.open() as file:
            return file.read()

    async def apply(
        self, work: Callable[[bytes], T], *, first: Callable[[], object] | None = None
    ) -> T:
        """``work`` of the whole body, called only once the body passed its check;
        ``first`` (a check of the headers that must come before the body's, such as a
        signature) runs before anything else and may raise.

        An inline body: ``first``, the hash, the check and ``work`` run in one
        worker-thread hop (none below ``THREAD_HASH_MIN``, where a hop costs more than
        the work), so a stage pays one cross-thread hand-off per message; a mismatch
        raises before ``work`` runs. A blob: ``first`` runs, the blob is read
        (``read``), then ``work`` runs in a worker thread.
        """
        if self.kind is BodyKind.INLINE:
            if len(self._data) < THREAD_HASH_MIN:
                return self._checked(work, first)
            return await asyncio.to_thread(self._checked, work, first)
        if first is not None:
            first()
        return await asyncio.to_thread(work, await self.read())

    async def open(self) -> IO[bytes]:
        """The body as a readable file at offset 0, checked; the caller closes it. A blob
        is hashed as it is copied into a private spool file (no second pass)."""
        if self.kind is BodyKind.INLINE:
            return await self.apply(io.BytesIO)  # shares the bytes: no copy
        instance, transport = self._blob_source()
        file, sha256 = await transport.open_body_hashed(self._message, instance)
        try:
            size = file.seek(0, io.SEEK_END)
            file.seek(0)
            self._verify(size, sha256)
        except BaseException:
            file.close()
            raise
        return file

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """The body piece by piece, in constant memory; checked before the last piece."""
        if self.kind is BodyKind.INLINE:
            yield await self.read()
            return
        instance, transport = self._blob_source()
        digest = hashlib.sha256()
        size = 0
        held: bytes | None = None  # one piece behind, so the check comes before the last
        chunks = transport.blob_chunks(instance)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if len(chunk) >= THREAD_HASH_MIN:
                    await asyncio.to_thread(digest.update, chunk)
                else:
                    digest.update(chunk)
                size += len(chunk)
                if held is not None:
                    yield held
                held = chunk
        self._verify(size, digest.hexdigest())
        if held is not None:
            yield held

    def _checked(self, work: Callable[[bytes], T], first: Callable[[], object] | None) -> T:
        """``first``, then ``work`` of the inline body once its hash passed the check
        (in any thread)."""
        if first is not None:
            first()
        data = self._data
        self._verify(len(data), hashlib.sha256(data).hexdigest())
        return work(data)

    def _verify(self, size: int, sha256: str) -> None:
        if self._check is None:
            return
        try:
            self._check(size, sha256)
        except Exception:
            self.failed_check = True
            raise

    def _blob_source(self) -> tuple[Instance, Transport]:
        if self._instance is None or self._transport is None:
            raise ContractViolation("a blob body needs its instance and a transport")
        return self._instance, self._transport


def _same(data: bytes) -> bytes:
    return data


@dataclass(frozen=True, slots=True)
class Delivery(Generic[R]):
    """One message, decoded, as a stage's handler receives it."""

    record: R  # the validated header record
    body: Body
    attempt: int  # JetStream's delivery count of this message: 1 on the first delivery
    message: Msg  # the message as received (subject, headers, stream metadata)
    span: Span  # the consumer's span for this delivery (continues the message's trace)

    @property
    def traceparent(self) -> str:
        """The trace context the message arrived with ("" if none)."""
        return (self.message.headers or {}).get(H_TRACEPARENT, "")

    @property
    def stored_at(self) -> float | None:
        """When JetStream stored the message (epoch seconds), if it says."""
        try:
            return float(self.message.metadata.timestamp.timestamp())
        except (AttributeError, ValueError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class Decoded(Generic[R]):
    """What a decoder made of a message. ``error``: the headers are valid but the body
    breaks the contract; the handler is not called, yet a ``letter`` hook still sees
    the delivery (it may keep the body in a form of its own, or drop it)."""

    record: R
    body: Body
    error: ContractViolation | None = None


Decoder = Callable[[Msg], Decoded[R]]  # raises ContractViolation when the headers are off


def ingest(transport: Transport) -> Decoder[Instance]:
    """INGEST: the gateway's instance contract; the body is the plaintext, checked
    against ``Dicomflow-Size`` and ``Dicomflow-Sha256`` when read."""

    def decode(msg: Msg) -> Decoded[Instance]:
        instance, error = _decode(messages.decode_ingest, msg, sealed=False)

        def check(size: int, sha256: str) -> None:
            if (size, sha256) != (instance.size, instance.sha256):
                raise ContractViolation(
                    "body does not match its Dicomflow-Size/Dicomflow-Sha256 headers"
                )

        return Decoded(instance, Body(msg, instance, transport, check), error)

    return decode


def sealed(transport: Transport) -> Decoder[Instance]:
    """SEALED: the signed sealed-instance contract; the body is the A1 envelope, checked
    against the signed ``Dicomflow-Sealed-Sha256`` when read (``SealNotTrusted``)."""

    def decode(msg: Msg) -> Decoded[Instance]:
        instance, error = _decode(messages.decode_sealed, msg, sealed=True)

        def check(size: int, sha256: str) -> None:
            SealVerifier.check_digest(instance, sha256 if size == instance.sealed_size else "")

        return Decoded(instance, Body(msg, instance, transport, check), error)

    return decode


def raw(msg: Msg) -> Decoded[Msg]:
    """Any stream whose handler checks its own contract: the record is the message."""
    return Decoded(msg, Body(msg))


def deliver(decoder: Decoder[R], msg: Msg, span: Span = trace.INVALID_SPAN) -> Delivery[R]:
    """``msg`` decoded into a delivery, as the consumer hands it, for a caller that runs
    a handler itself (a tool, a test); raises ContractViolation as the consumer would
    dead-letter it."""
    decoded = decoder(msg)
    if decoded.error is not None:
        raise decoded.error
    return Delivery(decoded.record, decoded.body, msg.metadata.num_delivered, msg, span)


def _decode(
    contract: Callable[[dict[str, str] | None, bytes], Instance], msg: Msg, *, sealed: bool
) -> tuple[Instance, ContractViolation | None]:
    """The stream's whole contract (``contract``: headers and the checks of a body that
    need no blob read), the headers parsed once on the common path. When it fails, the
    headers alone are parsed again: if they are off, that raises (the body is dropped);
    if only the body is, the instance comes with the error."""
    try:
        return contract(msg.headers, msg.data), None
    except ContractViolation as exc:
        return messages.parse(msg.headers, sealed=sealed, signed=sealed), exc


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one delivery: done (``error`` None; ``after_ack`` runs once the
    ack went through) or failed with ``error`` (mapped by ``disposition``)."""

    after_ack: AfterAck | None = None
    error: Exception | None = None


BatchHandler = Callable[[Sequence[Delivery[R]]], Awaitable[Sequence[Outcome]]]
Handler = Callable[[Delivery[R]], Awaitable[AfterAck | None]]


def one_at_a_time(handler: Handler[R]) -> BatchHandler[R]:
    """A batch handler that runs ``handler`` on each delivery in turn, inside that
    delivery's span; an exception becomes that delivery's failed outcome."""

    async def handle(batch: Sequence[Delivery[R]]) -> Sequence[Outcome]:
        return [await _outcome(handler, delivery) for delivery in batch]

    return handle


def concurrently(handler: Handler[R]) -> BatchHandler[R]:
    """A batch handler that runs ``handler`` on every delivery of the batch at once,
    each inside its own span; an exception becomes that delivery's failed outcome.

    What the deliveries send goes out together: their publishes are written before any
    PubAck is awaited (nats-py coalesces what is pending into one socket write), and
    each delivery's outcome is answered only once its own publishes were acknowledged,
    so nothing is acked upstream before downstream has it. The consumer holds the byte
    budget for the batch it hands over.
    """

    async def handle(batch: Sequence[Delivery[R]]) -> Sequence[Outcome]:
        if len(batch) == 1:
            return [await _outcome(handler, batch[0])]
        return await asyncio.gather(*(_outcome(handler, delivery) for delivery in batch))

    return handle


async def _outcome(handler: Handler[R], delivery: Delivery[R]) -> Outcome:
    try:
        with trace.use_span(
            delivery.span,
            end_on_exit=False,
            record_exception=False,
            set_status_on_exception=False,
        ):
            return Outcome(await handler(delivery))
    except Exception as exc:  # noqa: BLE001 (mapped by disposition.decide)
        return Outcome(error=exc)
