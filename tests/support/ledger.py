"""A ledger-keeping DICOM sender (docs/reliability.md): one row per C-STORE it attempted.

Worker threads each act like a modality: they make CT-like instances, send them over
real DICOM associations (pynetdicom, in process) to the scp-gateway, and record for every
C-STORE the SOP Instance UID, the SHA-256 of the dataset bytes sent (what travels over
DIMSE: the file without preamble and file meta) and the status: ``success``, ``failed``
(any other status, its code kept) or ``unknown`` (no answer: the association aborted or
timed out). An instance not answered Success is sent again on a new association later,
as a modality would; a re-send after an unknown must not create a second object.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from support.dicomfiles import dataset, write

SUCCESS, FAILED, UNKNOWN = "success", "failed", "unknown"

# pynetdicom logs every association at INFO and an abort as an error: noise under faults.
logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def dataset_digest(part10: bytes) -> str:
    """SHA-256 of a Part-10 file's dataset: the bytes after preamble and file meta.

    The file meta differs between what a sender has and what the gateway spooled (the
    receiver writes its own), so both sides are compared in this form.
    """
    if part10[128:132] != b"DICM":
        raise ValueError("not a DICOM Part-10 file (no DICM prefix)")
    group_length = int.from_bytes(part10[140:144], "little")  # (0002,0000) UL, explicit VR
    return hashlib.sha256(part10[132 + 12 + group_length :]).hexdigest()


@dataclass(frozen=True, slots=True)
class Row:
    sop_instance_uid: str
    sha256: str
    status: str  # SUCCESS, FAILED or UNKNOWN
    code: int | None  # the DIMSE status, None when there was no answer
    at: float


class Ledger:
    """Thread-safe list of rows, and the figures drawn from it."""

    def __init__(self) -> None:
        self._rows: list[Row] = []
        self._lock = threading.Lock()

    def add(self, row: Row) -> None:
        with self._lock:
            self._rows.append(row)

    def rows(self) -> list[Row]:
        with self._lock:
            return list(self._rows)

    def digests(self) -> dict[str, str]:
        """SHA-256 per SOP Instance UID of every instance sent (one content per UID)."""
        return {r.sop_instance_uid: r.sha256 for r in self.rows()}

    def succeeded(self) -> dict[str, str]:
        """SOP Instance UID -> SHA-256 of every instance answered Success at least once."""
        return {r.sop_instance_uid: r.sha256 for r in self.rows() if r.status == SUCCESS}

    def counts(self) -> Counter[str]:
        return Counter(r.status for r in self.rows())

    def failure_codes(self) -> Counter[str]:
        return Counter(f"0x{r.code:04X}" for r in self.rows() if r.status == FAILED and r.code)


@dataclass
class _Pending:
    path: Path
    sop_instance_uid: str
    sha256: str


def _stacks(threads: list[threading.Thread]) -> str:
    """Where each of ``threads`` is now: for a report on a sender that did not finish."""
    frames = sys._current_frames()
    return "\n".join(
        f"{t.name}:\n{''.join(traceback.format_stack(frames[t.ident]))}"
        for t in threads
        if t.ident in frames
    )


class Sender:
    """``workers`` modalities sending new instances until ``stop()``, then finishing retries."""

    def __init__(
        self,
        ledger: Ledger,
        folder: Path,
        port: int,
        *,
        called_ae: str = "DICOMFLOW",
        calling_ae: str = "STORESCU",
        workers: int = 4,
        rows: int = 128,
        columns: int = 128,
        per_association: int = 20,
        timeout: float = 30.0,
    ) -> None:
        self.ledger = ledger
        self._folder = folder
        self._port = port
        self._called = called_ae
        self._calling = calling_ae
        self._rows, self._columns = rows, columns
        self._per_association = per_association
        self._timeout = timeout
        self._new = threading.Event()  # set: no new instances, only retries
        self._give_up = threading.Event()  # set: stop retrying too
        self._seeds = itertools.count()
        self._seed_lock = threading.Lock()
        self._study = generate_uid()
        self.associations = Counter[str]()  # established / refused
        self.stuck = ""  # stacks of the workers still busy when stop() gave up on them
        self._threads = [
            threading.Thread(target=self._run, args=(i,), name=f"sender-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> Sender:
        self._folder.mkdir(parents=True, exist_ok=True)
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, retry_for: float = 120.0) -> list[str]:
        """No new instances; retry the unanswered for up to ``retry_for`` seconds.

        Returns the SOP Instance UIDs never answered Success (given up on).
        """
        self._new.set()
        deadline = time.monotonic() + retry_for
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.1))
        self._give_up.set()
        self.stuck = _stacks([t for t in self._threads if t.is_alive()])
        for thread in self._threads:
            thread.join(timeout=self._timeout + 10)
        done = self.ledger.succeeded()
        return sorted(uid for uid in self.ledger.digests() if uid not in done)

    # -- one modality ------------------------------------------------------------------
    def _make(self, worker: int) -> _Pending:
        with self._seed_lock:
            seed = next(self._seeds)
        ds = dataset(
            CTImageStorage,
            modality="CT",
            rows=self._rows,
            columns=self._columns,
            study_uid=self._study,
            seed=seed,
        )
        path = write(ds, self._folder / f"w{worker}-{seed:06d}.dcm", ExplicitVRLittleEndian)
        return _Pending(path, str(ds.SOPInstanceUID), dataset_digest(path.read_bytes()))

    def _run(self, worker: int) -> None:
        ae = AE(ae_title=self._calling)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self._timeout
        retry: list[_Pending] = []
        while not self._give_up.is_set():
            if self._new.is_set() and not retry:
                return
            assoc = ae.associate("127.0.0.1", self._port, ae_title=self._called)
            if not assoc.is_established:
                self.associations["refused"] += 1
                time.sleep(0.3)  # the gateway is down or busy: a modality waits and retries
                continue
            self.associations["established"] += 1
            try:
                for _ in range(self._per_association):
                    if self._give_up.is_set():
                        break
                    if retry:
                        item = retry.pop(0)
                    elif self._new.is_set():
                        break
                    else:
                        item = self._make(worker)
                    status = self._store(assoc, item)
                    if status != SUCCESS:
                        retry.append(item)
                        break  # a new association for what follows
                    item.path.unlink()
            finally:
                if assoc.is_established:
                    assoc.release()
                else:
                    assoc.abort()
            if retry:
                time.sleep(0.3)

    def _store(self, assoc: Any, item: _Pending) -> str:
        code: int | None = None
        try:
            answer = assoc.send_c_store(item.path)
            if "Status" in answer:
                code = int(answer.Status)
        except Exception:  # noqa: BLE001 (the association died mid-request: no answer)
            code = None
        status = UNKNOWN if code is None else SUCCESS if code == 0 else FAILED
        self.ledger.add(Row(item.sop_instance_uid, item.sha256, status, code, time.time()))
        return status
