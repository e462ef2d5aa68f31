"""One error table per edge: every library exception class becomes one dicomflow type,
and that type alone says what happens to the message (docs/errors.md)."""

from __future__ import annotations

import inspect
from types import ModuleType

import nats.errors
import nats.js.errors
import obstore.exceptions
import pytest
from dicomflow.shared.errors import (
    BrokerUnavailable,
    ContractViolation,
    DicomflowError,
    EnvelopeError,
    ErrorTable,
    IntegrityError,
    Outage,
    PermanentError,
    StorageUnavailable,
    TransientError,
    TruncatedEnvelope,
    UnknownMasterKey,
    UnsupportedVersion,
)
from dicomflow.shared.nats import errormap as nats_map
from dicomflow.shared.settings import ConsumerSettings
from dicomflow.shared.stage.disposition import Action, Kind, decide, kind
from dicomflow.shared.storage import errormap as storage_map
from dicomflow.shared.storage import objectstore
from obstore.store import MemoryStore

SETTINGS = ConsumerSettings(max_deliver=5)
UID = "1.2.826.0.1.3680043.8.498.12345"


def classes(module: ModuleType) -> list[type[BaseException]]:
    """Every exception class ``module`` defines."""
    return [
        c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, BaseException) and c.__module__ == module.__name__
    ]


def instance(cls: type[BaseException]) -> BaseException:
    """``cls()``, or with None for each argument its constructor requires."""
    try:
        return cls()
    except TypeError:
        required = [
            p
            for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        return cls(*[None] * len(required))


def raised_through(table: ErrorTable, exc: BaseException) -> BaseException:
    """What leaves ``table.mapping`` when ``exc`` is raised inside it."""
    with pytest.raises(BaseException) as leaving, table.mapping("could not do it", "try this"):
        raise exc
    return leaving.value


NATS_ANSWERS = [
    nats.js.errors.NotFoundError,
    nats.js.errors.KeyNotFoundError,
    nats.js.errors.KeyDeletedError,
    nats.js.errors.BucketNotFoundError,
    nats.js.errors.ObjectNotFoundError,
    nats.js.errors.ObjectDeletedError,
    nats.js.errors.KeyWrongLastSequenceError,
]


@pytest.mark.parametrize(
    "cls",
    classes(nats.errors) + classes(nats.js.errors),
    ids=lambda c: f"{c.__module__}.{c.__name__}",
)
def test_every_nats_error_is_an_outage_or_an_answer(cls: type[BaseException]) -> None:
    exc = instance(cls)
    out = raised_through(nats_map.TABLE, exc)
    if cls in NATS_ANSWERS:
        assert out is exc  # the caller decides on "not found", "wrong last sequence"
        return
    assert type(out) is BrokerUnavailable
    assert out.__cause__ is exc
    assert kind(out) is Kind.OUTAGE
    assert decide(out, 1, SETTINGS).action is Action.NAK  # after the ride-out


@pytest.mark.parametrize(
    "exc",
    [
        OSError(5, "Input/output error"),
        ConnectionResetError(104, "Connection reset by peer"),
        BrokenPipeError(32, "Broken pipe"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_os_errors_and_timeouts_under_a_nats_call_are_outages(exc: BaseException) -> None:
    out = raised_through(nats_map.TABLE, exc)
    assert type(out) is BrokerUnavailable
    assert kind(out) is Kind.OUTAGE


@pytest.mark.parametrize("cls", classes(obstore.exceptions), ids=lambda c: c.__name__)
def test_every_obstore_error_is_an_outage_or_an_answer(cls: type[BaseException]) -> None:
    exc = cls("Generic S3 error: HEAD http://s3/bucket/objects/" + UID + "\n\nDebug source: ...")
    out = raised_through(storage_map.TABLE, exc)
    if cls is obstore.exceptions.AlreadyExistsError:
        assert out is exc  # put(create=True) makes it ObjectExists
        return
    assert type(out) is StorageUnavailable
    assert out.__cause__ is exc
    assert kind(out) is Kind.OUTAGE
    assert UID not in str(out)  # object paths carry UIDs: redacted
    assert "Debug source" not in str(out)  # the first line only


@pytest.mark.parametrize(
    "exc",
    [
        OSError(28, "No space left on device"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_os_errors_and_timeouts_under_a_storage_call_are_outages(exc: BaseException) -> None:
    out = raised_through(storage_map.TABLE, exc)
    assert type(out) is StorageUnavailable
    assert kind(out) is Kind.OUTAGE


def test_a_missing_object_is_an_answer_not_an_outage() -> None:
    exc = FileNotFoundError("not found")
    assert raised_through(storage_map.TABLE, exc) is exc


async def test_storage_answers_reach_the_caller_through_objectstore() -> None:
    store = MemoryStore()
    assert not await objectstore.exists(store, "absent")
    with pytest.raises(FileNotFoundError):
        await objectstore.size_of(store, "absent")


@pytest.mark.parametrize("table", [nats_map.TABLE, storage_map.TABLE], ids=["nats", "storage"])
def test_dicomflow_errors_and_unlisted_errors_leave_unchanged(table: ErrorTable) -> None:
    for exc in (ContractViolation("bad header"), ValueError("a bug"), KeyError("k")):
        assert raised_through(table, exc) is exc


def test_the_message_says_what_failed_and_what_to_do_without_uids() -> None:
    out = raised_through(nats_map.TABLE, ConnectionResetError(104, f"reset reading {UID}"))
    assert str(out).startswith("could not do it (ConnectionResetError: ")
    assert str(out).endswith("; try this")
    assert UID not in str(out)


@pytest.mark.parametrize(
    "exc",
    [
        EnvelopeError("x"),
        TruncatedEnvelope("x"),
        UnsupportedVersion("x"),
        UnknownMasterKey(7),
        IntegrityError("the GCM tag did not verify"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_envelope_errors_are_permanent_by_type(exc: EnvelopeError) -> None:
    assert isinstance(exc, PermanentError)
    assert kind(exc) is Kind.PERMANENT
    assert decide(exc, 1, SETTINGS).action is Action.DEAD_LETTER


def test_the_hierarchy_says_permanent_transient_or_outage() -> None:
    assert issubclass(BrokerUnavailable, Outage) and issubclass(StorageUnavailable, Outage)
    assert issubclass(Outage, TransientError)
    assert kind(TransientError("peer busy")) is Kind.TRANSIENT
    assert kind(RuntimeError("unforeseen")) is Kind.TRANSIENT
    assert kind(DicomflowError("other")) is Kind.TRANSIENT
