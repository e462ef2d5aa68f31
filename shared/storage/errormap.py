"""The storage edge's error table: what obstore raises, as dicomflow's types.

Every request to object storage runs inside ``storage_errors(what)`` (in
``objectstore``). "Not found" (``FileNotFoundError``, which obstore raises for a
missing object) and "already exists" (``AlreadyExistsError``, from a create-only put)
are answers: they leave the block as they are, for the caller to decide on. Every
other failure means that the store did not do what was asked, for now:
``StorageUnavailable``, an ``Outage``, which the consumer rides out in place. That
includes refused credentials and permissions (an operator mends them; the messages
wait, none is dead-lettered for it), a connection reset by the OS, and a timeout. The
classes are listed one by one so that docs/errors.md and the tests can name them.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import obstore.exceptions as oe
from dicomflow.shared.errors import ErrorTable, StorageUnavailable

ANSWERS: tuple[type[BaseException], ...] = (FileNotFoundError, oe.AlreadyExistsError)

_FAILURES: tuple[type[BaseException], ...] = (
    oe.GenericError,  # the backend's HTTP or I/O failure, after obstore's own retries
    oe.PermissionDeniedError,  # 403: a bucket policy or role changed
    oe.UnauthenticatedError,  # 401: expired or rotated credentials
    oe.PreconditionError,  # a conditional request lost a race: try again
    oe.NotModifiedError,
    oe.JoinError,  # obstore's worker task failed or was cancelled
    oe.NotSupportedError,
    oe.InvalidPathError,
    oe.UnknownConfigurationKeyError,
    oe.NotFoundError,  # obstore raises FileNotFoundError for a missing object; not this
    oe.BaseError,  # every other obstore error
    TimeoutError,
    ConnectionError,  # reset, refused, aborted, broken pipe
    OSError,  # the local backend's file system; a read of the body being written
)

TABLE = ErrorTable(
    answers=ANSWERS,
    rows=tuple((source, StorageUnavailable) for source in _FAILURES),
)


def storage_errors(what: str, advice: str = "") -> AbstractContextManager[None]:
    """``with storage_errors("writing object failed"): ...``: storage failures inside
    become ``StorageUnavailable("writing object failed (...)")``; answers pass."""
    return TABLE.mapping(what, advice)
