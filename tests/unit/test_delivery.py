"""The scu-gateway's delivery path without a peer: sender threads and the deliverer.

A fake association pool stands in for pynetdicom; storage is obstore's MemoryStore.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

import obstore
import pytest
from dicomflow.scu_gateway import delivery
from dicomflow.scu_gateway.association import Pair
from dicomflow.scu_gateway.delivery import Deliverer
from dicomflow.scu_gateway.sender import Senders
from dicomflow.scu_gateway.settings import DestinationSettings
from dicomflow.scu_gateway.status import DeliveryDeferred, DeliveryRefused
from dicomflow.shared.contracts import deliveries
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.crypto import envelope
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey
from dicomflow.shared.errors import (
    ConfigError,
    ContractViolation,
    DigestMismatch,
    IntegrityError,
    ObjectMissing,
)
from dicomflow.shared.spoolfolder import LOCK_NAME
from nats.aio.msg import Msg

PAIR: Pair = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")


class FakePool:
    """Records what each C-STORE would have sent; answers from ``statuses`` in turn
    (an exception is raised instead of answered); ``gate`` holds every send until set."""

    name = "PEER"

    def __init__(self, *statuses: int | Exception, gate: threading.Event | None = None) -> None:
        self.statuses = list(statuses)
        self.sent: list[bytes] = []
        self.threads: set[str] = set()
        self.gate = gate
        self.started = threading.Event()

    def before_written(self, path: Path) -> None:
        """Just before the request counts as written: a subclass may look around here."""

    def on_wire(self, path: Path) -> None:
        """Between the request written and the response: a subclass may wait here."""

    def store(self, path: Path, pair: Pair, written: Callable[[], None] | None = None) -> int:
        assert pair == PAIR
        self.threads.add(threading.current_thread().name)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.sent.append(path.read_bytes())
        self.before_written(path)
        if written is not None:
            written()
        self.on_wire(path)
        outcome = self.statuses.pop(0) if self.statuses else 0x0000
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


def leftovers(folder: Path) -> list[Path]:
    """What a folder holds, but the spool folder's lock file (no plaintext in it)."""
    return sorted(p for p in folder.iterdir() if p.name != LOCK_NAME)


def spool_file(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


async def test_senders_send_each_file_then_remove_it(tmp_path: Path) -> None:
    pool = FakePool(0x0000, 0xB000, 0xA700)
    senders = Senders(pool, 2)  # type: ignore[arg-type]
    try:
        files = [spool_file(tmp_path, f"{i}.dcm", bytes([i]) * 10) for i in range(3)]
        jobs = [senders.submit(path, PAIR) for path in files]
        statuses = [await job.status() for job in jobs]
    finally:
        senders.close()
    assert sorted(statuses) == [0x0000, 0xA700, 0xB000]
    assert sorted(pool.sent) == [bytes([i]) * 10 for i in range(3)]
    assert leftovers(tmp_path) == []


async def test_senders_hand_the_pool_error_to_the_waiting_handler(tmp_path: Path) -> None:
    pool = FakePool(DeliveryDeferred("peer gone"), 0x0000)
    senders = Senders(pool, 1)  # type: ignore[arg-type]
    try:
        first = senders.submit(spool_file(tmp_path, "a.dcm", b"a"), PAIR)
        second = senders.submit(spool_file(tmp_path, "b.dcm", b"b"), PAIR)
        with pytest.raises(DeliveryDeferred, match="peer gone"):
            await first.status()
        assert await second.status() == 0x0000  # the thread goes on after a failure
    finally:
        senders.close()
    assert leftovers(tmp_path) == []


class HeldOnWire(FakePool):
    """Holds the second request on the wire, as a peer slow to answer would."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = threading.Event()
        self.first_kept: list[bool] = []

    def before_written(self, path: Path) -> None:
        if path.name == "second.dcm":  # the first's file goes when its outcome is told
            self.first_kept.append((path.parent / "first.dcm").exists())

    def on_wire(self, path: Path) -> None:
        if path.name == "second.dcm":
            assert self.answer.wait(10)


async def test_an_outcome_is_told_once_the_next_request_is_written(tmp_path: Path) -> None:
    gate = threading.Event()
    pool = HeldOnWire()
    pool.gate = gate
    senders = Senders(pool, 1)  # type: ignore[arg-type]
    try:
        first_path = spool_file(tmp_path, "first.dcm", b"first")
        first = senders.submit(first_path, PAIR)
        assert await asyncio.to_thread(pool.started.wait, 10)
        second = senders.submit(spool_file(tmp_path, "second.dcm", b"second"), PAIR)
        waiting = asyncio.create_task(first.status())
        gate.set()
        # Not told before the second request was written, but while it waits for its
        # answer.
        assert await asyncio.wait_for(waiting, 10) == 0x0000
        assert pool.first_kept == [True]
        assert not first_path.exists()
        assert not second.result.done()
        pool.answer.set()
        assert await second.status() == 0x0000
    finally:
        pool.answer.set()
        senders.close()
    assert pool.sent == [b"first", b"second"]
    assert leftovers(tmp_path) == []


async def test_cancelled_handler_skips_its_queued_instance(tmp_path: Path) -> None:
    gate = threading.Event()
    pool = FakePool(gate=gate)
    senders = Senders(pool, 1)  # type: ignore[arg-type]
    try:
        busy = senders.submit(spool_file(tmp_path, "busy.dcm", b"busy"), PAIR)
        assert await asyncio.to_thread(pool.started.wait, 10)
        queued = senders.submit(spool_file(tmp_path, "queued.dcm", b"queued"), PAIR)
        waiting = asyncio.create_task(queued.status())
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()
        assert await busy.status() == 0x0000
        last = senders.submit(spool_file(tmp_path, "last.dcm", b"last"), PAIR)
        assert await last.status() == 0x0000
    finally:
        senders.close()
    assert pool.sent == [b"busy", b"last"]
    assert leftovers(tmp_path) == []


async def test_close_removes_what_was_never_sent(tmp_path: Path) -> None:
    gate = threading.Event()
    pool = FakePool(gate=gate)
    senders = Senders(pool, 1)  # type: ignore[arg-type]
    first = senders.submit(spool_file(tmp_path, "a.dcm", b"a"), PAIR)
    assert await asyncio.to_thread(pool.started.wait, 10)
    senders.submit(spool_file(tmp_path, "b.dcm", b"b"), PAIR)
    gate.set()
    await asyncio.to_thread(senders.close)
    assert await first.status() == 0x0000
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        senders.submit(spool_file(tmp_path, "c.dcm", b"c"), PAIR)


# -- the deliverer ----------------------------------------------------------------------
KEY = MasterKey(1, bytes(range(32)))
DEST = DestinationSettings(ae_title="PACS", host="127.0.0.1", port=104, max_associations=2)
REPLY = "$JS.ACK.DELIVERY.deliver-PEER.1.7.7.1700000000000000000.0"


def instance_of(plain: bytes, sealed: bytes, sop_instance_uid: str) -> Instance:
    return Instance(
        sop_class_uid=PAIR[0],
        sop_instance_uid=sop_instance_uid,
        study_uid="1.2.3",
        series_uid="1.2.3.1",
        calling_ae="CT01",
        called_ae="DICOMFLOW",
        transfer_syntax=PAIR[1],
        size=len(plain),
        sha256=hashlib.sha256(plain).hexdigest(),
        modality="CT",
        key_id=KEY.key_id,
        sealed_size=len(sealed),
    )


def sealed_request(store: obstore.store.MemoryStore, plain: bytes, key: str) -> Msg:
    sealed = envelope.seal(KEY, plain)
    obstore.put(store, key, sealed)
    req = deliveries.DeliveryRequest(instance_of(plain, sealed, f"1.2.3.{len(plain)}"), key, "PEER")
    return Msg(_client=None, subject="dicomflow.deliver.PEER", reply=REPLY, headers=req.headers())  # type: ignore[arg-type]


def deliverer(pool: FakePool, spool: Path) -> tuple[Deliverer, obstore.store.MemoryStore]:
    store = obstore.store.MemoryStore()
    return Deliverer("PEER", DEST, pool, store, KeyRing(KEY), spool), store  # type: ignore[arg-type]


@pytest.mark.parametrize("in_memory", [True, False])
async def test_deliverer_sends_the_verified_plaintext(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_memory: bool
) -> None:
    if not in_memory:  # the streaming path of large objects
        monkeypatch.setattr(delivery, "IN_MEMORY_MAX", 100)
    pool = FakePool()
    d, store = deliverer(pool, tmp_path)
    try:
        plain = os.urandom(5000)
        assert await d.handle(sealed_request(store, plain, "k/1")) is None
    finally:
        d.close()
    assert pool.sent == [plain]
    assert leftovers(tmp_path) == []  # spool folder and files gone


@pytest.mark.parametrize("in_memory", [True, False])
async def test_tampered_object_never_reaches_the_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_memory: bool
) -> None:
    if not in_memory:
        monkeypatch.setattr(delivery, "IN_MEMORY_MAX", 100)
    pool = FakePool()
    d, store = deliverer(pool, tmp_path)
    try:
        msg = sealed_request(store, os.urandom(5000), "k/1")
        sealed = bytearray(bytes(obstore.get(store, "k/1").bytes()))
        sealed[100] ^= 1
        obstore.put(store, "k/1", bytes(sealed))
        with pytest.raises(IntegrityError):
            await d.handle(msg)
        assert leftovers(tmp_path) == [tmp_path / d._spool.name]
        assert leftovers(d._spool) == []  # nothing left behind
    finally:
        d.close()
    assert pool.sent == []


async def test_longer_object_than_recorded_is_refused_unread(tmp_path: Path) -> None:
    pool = FakePool()
    d, store = deliverer(pool, tmp_path)
    try:
        msg = sealed_request(store, b"x" * 3000, "k/1")
        sealed = bytes(obstore.get(store, "k/1").bytes())
        obstore.put(store, "k/1", sealed + bytes(10_000_000))
        with pytest.raises(IntegrityError, match="not the 3086 bytes"):
            await d.handle(msg)
    finally:
        d.close()
    assert pool.sent == []


async def test_plaintext_of_another_digest_is_not_sent(tmp_path: Path) -> None:
    pool = FakePool()
    d, store = deliverer(pool, tmp_path)
    try:
        msg = sealed_request(store, b"x" * 3000, "k/1")
        obstore.put(store, "k/1", envelope.seal(KEY, b"y" * 3000))  # verifies, other bytes
        with pytest.raises(DigestMismatch):
            await d.handle(msg)
    finally:
        d.close()
    assert pool.sent == []


async def test_missing_object_is_typed(tmp_path: Path) -> None:
    d, store = deliverer(FakePool(), tmp_path)
    try:
        msg = sealed_request(store, b"x" * 3000, "k/1")
        obstore.delete(store, "k/1")
        with pytest.raises(ObjectMissing):
            await d.handle(msg)
    finally:
        d.close()


@pytest.mark.parametrize(
    ("status", "error"), [(0xA700, DeliveryDeferred), (0x0122, DeliveryRefused)]
)
async def test_failure_status_settles_as_before(
    tmp_path: Path, status: int, error: type[Exception]
) -> None:
    pool = FakePool(status)
    d, store = deliverer(pool, tmp_path)
    try:
        with pytest.raises(error, match=f"0x{status:04X}"):
            await d.handle(sealed_request(store, b"x" * 3000, "k/1"))
    finally:
        d.close()
    assert len(pool.sent) == 1
    assert leftovers(tmp_path) == []


async def test_concurrent_handlers_use_every_sender(tmp_path: Path) -> None:
    """Both associations' threads send at once (two C-STOREs in flight), and each
    outcome settles its own handler: one refusal among four fails that one only."""
    gate = threading.Event()
    pool = FakePool(0x0000, 0x0000, 0x0000, 0x0122, gate=gate)
    d, store = deliverer(pool, tmp_path)
    try:
        msgs = [sealed_request(store, bytes([i]) * (1000 + i), f"k/{i}") for i in range(4)]
        tasks = [asyncio.create_task(d.handle(m)) for m in msgs]
        for _ in range(500):
            if len(pool.threads) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(pool.threads) == 2  # both blocked in a C-STORE at the same time
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        d.close()
    assert sum(isinstance(r, DeliveryRefused) for r in results) == 1
    assert sum(r is None for r in results) == 3
    assert len(pool.sent) == 4


def test_unusable_spool_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(ConfigError, match="spool_dir"):
        Deliverer(
            "PEER",
            DEST,
            FakePool(),  # type: ignore[arg-type]
            obstore.store.MemoryStore(),
            KeyRing(KEY),
            blocker / "spool",
        )


def test_missing_spool_dir_is_created(tmp_path: Path) -> None:
    d, _ = deliverer(FakePool(), tmp_path / "a" / "b")
    try:
        assert d._spool.parent == tmp_path / "a" / "b"
        assert d._spool.stat().st_mode & 0o777 == 0o700
    finally:
        d.close()
    assert leftovers(tmp_path / "a" / "b") == []


# -- requests relayed before storage ----------------------------------------------------
def relayed_request(sealed: bytes, plain: bytes) -> Msg:
    req = deliveries.DeliveryRequest(
        instance_of(plain, sealed, "1.2.3.99"), "", "PEER", relayed=True
    )
    return Msg(  # type: ignore[arg-type]
        _client=None,
        subject="dicomflow.deliver.PEER",
        reply=REPLY,
        headers=req.headers(),
        data=sealed,
    )


async def test_relayed_request_is_sent_from_its_body_without_reading_storage(
    tmp_path: Path,
) -> None:
    pool = FakePool()
    d, store = deliverer(pool, tmp_path)
    plain = os.urandom(5000)
    msg = relayed_request(envelope.seal(KEY, plain), plain)
    assert deliveries.H_OBJECT_KEY not in (msg.headers or {})
    try:
        assert await d.handle(msg) is None
    finally:
        d.close()
    assert pool.sent == [plain]
    assert obstore.list(store).collect() == []  # storage holds nothing: it was never read


async def test_tampered_relayed_body_never_reaches_the_peer(tmp_path: Path) -> None:
    pool = FakePool()
    d, _ = deliverer(pool, tmp_path)
    plain = os.urandom(5000)
    sealed = bytearray(envelope.seal(KEY, plain))
    sealed[200] ^= 1
    try:
        with pytest.raises(IntegrityError):
            await d.handle(relayed_request(bytes(sealed), plain))
        with pytest.raises(ContractViolation, match="relayed body is 10 bytes"):
            msg = relayed_request(envelope.seal(KEY, plain), plain)
            msg.data = b"0123456789"
            await d.handle(msg)
    finally:
        d.close()
    assert pool.sent == []
