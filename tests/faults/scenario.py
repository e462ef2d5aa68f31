"""Runs one fault scenario: ledger-keeping load, a fault injector on a schedule, the checker.

The length of the load comes from ``DICOMFLOW_FAULT_MINUTES`` (minutes per scenario,
short by default so that CI runs all of them in a few minutes); ``scripts/faults`` sets
it higher. Each scenario's figures are printed and, when ``DICOMFLOW_FAULT_REPORT``
names a file, appended to it as one JSON line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol

import nats
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dicomflow.shared.contracts import subjects
from dicomflow.shared.contracts.messages import Instance
from dicomflow.shared.crypto.envelope import seal
from dicomflow.shared.crypto.keyring import generate_master_key_file, load_master_key
from dicomflow.shared.crypto.sealsign import SealSigner, load_signing_key
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from faults.checker import POISON_HEADER, Poison, Report, check
from support.ledger import Ledger, Sender
from support.pipeline import Pipeline

MINUTES_ENV = "DICOMFLOW_FAULT_MINUTES"
REPORT_ENV = "DICOMFLOW_FAULT_REPORT"
DEFAULT_MINUTES = 0.25


def load_seconds() -> float:
    raw = os.environ.get(MINUTES_ENV, "")
    try:
        minutes = float(raw) if raw else DEFAULT_MINUTES
    except ValueError:
        raise ValueError(f"{MINUTES_ENV}={raw!r} is not a number of minutes") from None
    if minutes <= 0:
        raise ValueError(f"{MINUTES_ENV} must be above 0, not {raw}")
    return minutes * 60


class Injector:
    """Runs ``actions`` in turn, one every ``every`` seconds, until stopped."""

    def __init__(self, actions: list[tuple[str, Callable[[], None]]], every: float) -> None:
        self.faults: Counter[str] = Counter()
        self._actions = actions
        self._every = every
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fault-injector", daemon=True)

    def start(self) -> Injector:
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self._every):
            kind, action = self._actions[n % len(self._actions)]
            n += 1
            try:
                action()
            except BaseException as exc:  # noqa: BLE001 (re-raised by stop())
                self._error = exc
                return
            self.faults[kind] += 1

    def stop(self) -> Counter[str]:
        self._stop.set()
        self._thread.join(timeout=300)
        if self._error is not None:
            raise RuntimeError("a fault action failed") from self._error
        return self.faults


def kill_and_restart(pipeline: Pipeline, name: str, down: float = 0.5) -> Callable[[], None]:
    def act() -> None:
        pipeline.kill(name)
        time.sleep(down)
        pipeline.start(name, timeout=120)

    return act


class Target(Protocol):
    """What a scenario loads and drains: a single-zone ``Pipeline``, or a hybrid edge."""

    port: int  # the scp-gateway's DICOM port

    def wait_drained(self, timeout: float = ...) -> None: ...


Checker = Callable[[str, Any, Ledger, Counter[str], list[Poison], list[str]], Report]


def run(
    scenario: str,
    pipeline: Target,
    folder: Path,
    injector: Injector,
    *,
    workers: int = 4,
    rows: int = 128,
    poisons: list[Poison] | None = None,
    drain_timeout: float = 240.0,
    checker: Checker = check,
) -> Report:
    """Load for ``load_seconds()`` under faults, drain, check; fail on any violation.
    ``checker``: the properties' check of ``pipeline`` (``checker.check`` by default)."""
    ledger = Ledger()
    sender = Sender(ledger, folder, pipeline.port, workers=workers, rows=rows, columns=rows)
    sender.start()
    injector.start()
    timeline: list[int] = []  # C-STOREs answered Success, every 5 s of load
    try:
        end = time.monotonic() + load_seconds()
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(5.0, left))
            timeline.append(ledger.counts()["success"])
    finally:
        faults = injector.stop()
        given_up = sender.stop(retry_for=180)
        if sender.stuck:
            print(f"\n[faults:{scenario}] sender workers still busy:\n{sender.stuck}")
    with contextlib.suppress(TimeoutError):  # the checker names what is left (L5)
        pipeline.wait_drained(timeout=drain_timeout)
    poisons = poisons if poisons is not None else []  # the caller may still append
    report = _settled_check(scenario, pipeline, ledger, faults, poisons, given_up, checker)
    report.timeline = timeline
    print("\n" + report.line())
    target = os.environ.get(REPORT_ENV)
    if target:
        with Path(target).open("a") as out:
            out.write(json.dumps(report.summary()) + "\n")
    return report


def _settled_check(
    scenario: str,
    pipeline: Target,
    ledger: Ledger,
    faults: Counter[str],
    poisons: list[Poison],
    given_up: list[str],
    checker: Checker,
) -> Report:
    """Check; while only L5 in-flight leftovers remain, wait a little and check again.

    Streams can be empty while a consumer still settles its last message (and a poison
    still waits out its backoff): only what remains after a bounded wait is a failure.
    """
    deadline = time.monotonic() + 60
    while True:
        report = checker(scenario, pipeline, ledger, faults, poisons, given_up)
        transient = all(p.startswith("L5") for p in report.problems)
        if not report.problems or not transient or time.monotonic() > deadline:
            return report
        time.sleep(2)


# -- poison messages ------------------------------------------------------------------
def _instance(plain: bytes) -> Instance:
    return Instance(
        sop_class_uid=str(CTImageStorage),
        sop_instance_uid=generate_uid(),
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        calling_ae="STORESCU",
        called_ae="DICOMFLOW",
        transfer_syntax=str(ExplicitVRLittleEndian),
        size=len(plain),
        sha256=hashlib.sha256(plain).hexdigest(),
        modality="CT",
    )


class PoisonMaker:
    """Publishes poison straight to INGEST or SEALED, as a forged or broken peer would."""

    # Reasons expected in the dead letter, by kind.
    REASONS: ClassVar[dict[str, str]] = {
        "undecodable": "ContractViolation",
        "bad-digest": "ContractViolation",
        # Sealed by the encryptor, then one ciphertext bit flipped on the way.
        "bad-tag": "SealNotTrusted: digest check failed",
        # Sealed under a master key nobody has and signed by a forger's own key, claiming
        # to be the encryptor's.
        "unknown-key": "SealNotTrusted: signature check failed",
    }

    def __init__(self, pipeline: Pipeline, folder: Path) -> None:
        self._pipeline = pipeline
        self._n = 0
        self.injected: list[Poison] = []
        other = folder / "other-master.key"
        folder.mkdir(parents=True, exist_ok=True)
        generate_master_key_file(other)
        self._other_key = load_master_key(99, other)
        self._key = load_master_key(1, pipeline.key)
        self._signer = load_signing_key(pipeline.signing_key, "encryption.signing_key")
        self._forger = SealSigner(Ed25519PrivateKey.generate())

    def inject(self, *kinds: str) -> Callable[[], None]:
        """An action publishing one poison of each of ``kinds`` (all when none given)."""
        chosen = kinds or tuple(self.REASONS)
        return lambda: asyncio.run(self._inject(chosen))

    async def _inject(self, kinds: tuple[str, ...]) -> None:
        plain = os.urandom(4096)
        ingest = subjects.ingest_subject("DICOMFLOW", "STORESCU")
        sealed_subject = subjects.sealed_subject("DICOMFLOW", "STORESCU")
        batch: list[tuple[str, str, bytes, dict[str, str]]] = []

        headers = _instance(plain).headers()
        headers["Dicomflow-Schema"] = "999"  # a contract this build does not read
        batch.append(("undecodable", ingest, plain, headers))

        batch.append(("bad-digest", ingest, os.urandom(4096), _instance(plain).headers()))

        body = bytearray(seal(self._key, plain))
        sealed = self._signer.sign(
            _instance(plain).sealed(1, len(body), hashlib.sha256(body).hexdigest())
        )
        body[len(body) // 2] ^= 0x01  # one flipped ciphertext bit: the tag cannot verify
        batch.append(("bad-tag", sealed_subject, bytes(body), sealed.headers()))

        other = seal(self._other_key, plain)
        unknown = self._forger.sign(
            _instance(plain).sealed(99, len(other), hashlib.sha256(other).hexdigest())
        )
        claimed = unknown.signed(self._signer.signer, unknown.signature)
        batch.append(("unknown-key", sealed_subject, other, claimed.headers()))

        nc = await nats.connect(self._pipeline.nats.url)
        try:
            js = nc.jetstream()
            for kind, subject, data, hdrs in (b for b in batch if b[0] in kinds):
                self._n += 1
                ident = f"{kind}:{self._n}"
                hdrs[POISON_HEADER] = ident
                await js.publish(subject, data, headers=hdrs, timeout=10)
                self.injected.append(Poison(ident, kind, self.REASONS[kind]))
        finally:
            await nc.close()
