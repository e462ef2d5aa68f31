"""The NATS edge's error table: what nats-py raises, as dicomflow's types.

Every call to NATS that a stage or a command makes runs inside ``nats_errors(what)``.
"Not found" (a key, a bucket, a blob, a stream) and "wrong last sequence" (someone
else wrote the key first) are answers: they leave the block as they are, for the
caller to decide on. Every other failure means that NATS did not do what was asked,
for now: ``BrokerUnavailable``, an ``Outage``, which the consumer rides out in place.
That includes a connection reset by the OS, an asyncio timeout and JetStream's
"stream full" (a 503 or a 400 whose cause passes). The classes are listed one by one
so that docs/errors.md and the tests can name them; a class nats-py adds later falls
under ``nats.errors.Error`` (an outage) until it is listed.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import nats.errors as ne
import nats.js.errors as je
from dicomflow.shared.errors import BrokerUnavailable, ErrorTable

ANSWERS: tuple[type[BaseException], ...] = (
    je.NotFoundError,  # and KeyNotFound, KeyDeleted, BucketNotFound, ObjectNotFound, ObjectDeleted
    je.KeyWrongLastSequenceError,
)

_NOT_ANSWERING: tuple[type[BaseException], ...] = (
    ne.TimeoutError,  # FlushTimeout, DrainTimeout, FetchTimeout
    ne.NoRespondersError,  # no stream (leader) answers the subject: an election, a restart
    ne.ConnectionClosedError,
    ne.ConnectionReconnectingError,
    ne.ConnectionDrainingError,
    ne.StaleConnectionError,  # and UnexpectedEOF
    ne.OutboundBufferLimitError,
    ne.NoServersError,
    ne.SlowConsumerError,
    je.ServiceUnavailableError,  # 503: no quorum, stream full
    je.NoStreamResponseError,
    TimeoutError,  # asyncio.wait_for around a NATS call
    ConnectionError,  # reset, refused, aborted, broken pipe
    OSError,
)

_REFUSED: tuple[type[BaseException], ...] = (
    je.BadRequestError,  # 400: an expected sequence that moved on, a limit reached
    je.ServerError,
    je.APIError,
    ne.AuthorizationError,
    ne.SecureConnRequiredError,
    ne.SecureConnWantedError,
    ne.SecureConnFailedError,
    ne.InvalidUserCredentialsError,
    ne.MaxPayloadError,
    ne.BadSubjectError,
    ne.BadHeaderError,
    ne.ProtocolError,
    ne.MsgAlreadyAckdError,
    ne.Error,  # every other nats-py and JetStream error
)

TABLE = ErrorTable(
    answers=ANSWERS,
    rows=tuple((source, BrokerUnavailable) for source in _NOT_ANSWERING + _REFUSED),
)

# What a background loop (the blob sweeper, the uplink janitor) logs, and tries again
# at its next round, after ``nats_errors``: a failure, or an answer it did not expect.
RETRY_LATER: tuple[type[BaseException], ...] = (BrokerUnavailable, *ANSWERS)

# Retried while a stage starts (topology setup): NATS not answering yet, as opposed to
# answering "no" (a bad stream configuration must fail at once, with its reason).
NOT_ANSWERING = _NOT_ANSWERING


def nats_errors(what: str, advice: str = "") -> AbstractContextManager[None]:
    """``with nats_errors("could not publish the event"): ...``: NATS failures inside
    become ``BrokerUnavailable("could not publish the event (...)")``; answers pass."""
    return TABLE.mapping(what, advice)
