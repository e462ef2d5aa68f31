"""What a consumer stage is: its input, its handler, and what runs beside it.

A stage is a ``StageSpec`` and a handler; ``bootstrap.serve`` does the rest (connect,
topology, the durable consumer, the blob sweeper, drain on stop, telemetry). The
encryptor's spec, for example (``encryptor.service.spec``)::

    StageSpec(
        name="encryptor",
        stream=subjects.INGEST_STREAM,
        durable=subjects.ENCRYPTOR_DURABLE,
        decoder=delivery.ingest,
        build=build,                      # async (Wiring) -> Parts: the handler
        sweeps=subjects.BLOB_BUCKETS,     # this stage sweeps orphaned blobs
    )
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic

from dicomflow.shared.nats.transport import Transport
from dicomflow.shared.stage.consumer import Gate, LetterHook
from dicomflow.shared.stage.delivery import BatchHandler, Decoder, R
from dicomflow.shared.telemetry.health import Readiness

if TYPE_CHECKING:
    from dicomflow.shared.stage.bootstrap import Wiring


@dataclass(frozen=True, slots=True)
class Parts(Generic[R]):
    """What a stage's ``build`` returns: its handler, and the ``letter`` hook that makes
    what is dead-lettered of a message (default: the message as it came)."""

    handle: BatchHandler[R]
    letter: LetterHook[R] | None = None
    gate: Gate | None = None


@dataclass(frozen=True, slots=True)
class StageSpec(Generic[R]):
    """One consumer stage.

    - ``name``: the stage (logs, metrics, spans, its dead-letter subject).
    - ``stream``, ``durable``: its input; the durable consumer is created or updated
      from ``consumer`` settings at start.
    - ``decoder``: the stream's contract (``delivery.ingest``, ``delivery.sealed``,
      ``delivery.raw``), given the stage's body transport.
    - ``build``: called once connected (``Wiring``); returns the handler (``Parts``).
      Configuration it cannot use raises ``ConfigError`` (exit 2).
    - ``sweeps``: the blob buckets this stage sweeps of orphans, beside its consumer
      (``blobsweeper``); () for none. Chosen here, never from the stream's name.
    - ``readiness``: checks besides its NATS connections, added before connecting
      (``Readiness.add_storage``, ...).
    - ``batch``: the most deliveries handed to the handler at once; None: the stage's
      ``consumer.batch`` setting (for a handler that works a batch's deliveries
      together, ``delivery.concurrently``).
    """

    name: str
    stream: str
    durable: str
    decoder: Callable[[Transport], Decoder[R]]
    build: Callable[[Wiring], Awaitable[Parts[R]]]
    sweeps: tuple[str, ...] = ()
    readiness: Callable[[Readiness], None] | None = None
    batch: int | None = 1
