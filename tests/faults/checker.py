"""After a fault run has drained: the figures of docs/reliability.md, and its L1, L2, L4, L5.

Every object in storage is read back and decrypted with the real envelope code (tag
verified), its SOP Instance UID read from the plaintext and the SHA-256 of its dataset
bytes compared with the sender's ledger; ``dicomflow verify`` checks every index record
the same way (tag and the gateway's digest of the whole file).
"""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import nats
import obstore
from dicomflow.shared.contracts import subjects
from dicomflow.shared.crypto.envelope import open_bytes
from dicomflow.shared.crypto.keyload import load_keyring
from dicomflow.shared.errors import DicomflowError
from dicomflow.shared.settings import ReaderSettings, load_settings
from dicomflow.shared.storage import objectstore
from pydicom import dcmread

from support.ledger import FAILED, SUCCESS, UNKNOWN, Ledger, dataset_digest
from support.pipeline import Pipeline

POISON_HEADER = "Dicomflow-Fault-Poison"  # on injected poison: "<kind>:<n>"
DLQ_REASON = "Dicomflow-Dlq-Reason"


@dataclass(frozen=True, slots=True)
class Poison:
    ident: str  # the value of POISON_HEADER
    kind: str  # undecodable, bad-digest, bad-tag, unknown-key
    reason: str  # expected in the dead letter's reason


@dataclass
class Report:
    scenario: str
    instances: int = 0
    sent: int = 0
    success: int = 0
    failed: int = 0
    unknown: int = 0
    lost: int = 0
    unexpected: int = 0
    duplicates: int = 0
    dead_lettered: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    failure_codes: Counter[str] = field(default_factory=Counter)
    given_up: int = 0
    stored_objects: int = 0
    problems: list[str] = field(default_factory=list)
    timeline: list[int] = field(default_factory=list)  # successes so far, every 5 s of load

    def line(self) -> str:
        figures = {
            "instances": self.instances,
            "sent": self.sent,
            "success": self.success,
            "failed": self.failed,
            "unknown": self.unknown,
            "lost": self.lost,
            "unexpected": self.unexpected,
            "duplicates": self.duplicates,
            "dead-lettered": sum(self.dead_lettered.values()),
            "stored": self.stored_objects,
            "given-up": self.given_up,
        }
        text = " / ".join(f"{k} {v}" for k, v in figures.items())
        return (
            f"[faults:{self.scenario}] {text}\n"
            f"[faults:{self.scenario}] faults injected: {dict(sorted(self.faults.items()))}; "
            f"dead letters by kind: {dict(sorted(self.dead_lettered.items()))}; "
            f"failure statuses: {dict(sorted(self.failure_codes.items()))}\n"
            f"[faults:{self.scenario}] successes every 5 s of load: {self.timeline}"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "instances": self.instances,
            "sent": self.sent,
            "success": self.success,
            "failed": self.failed,
            "unknown": self.unknown,
            "lost": self.lost,
            "unexpected": self.unexpected,
            "duplicates": self.duplicates,
            "dead_lettered": dict(self.dead_lettered),
            "faults": dict(self.faults),
            "problems": self.problems,
            "timeline": self.timeline,
        }


@dataclass(frozen=True, slots=True)
class _Object:
    key: str
    sop_instance_uid: str  # "" when it did not decrypt or parse
    digest: str
    problem: str


def new_report(
    scenario: str, ledger: Ledger, faults: Counter[str], given_up: list[str] | None
) -> Report:
    """The ledger's figures, and the recovery check."""
    report = Report(scenario, faults=Counter(faults), given_up=len(given_up or []))
    rows = ledger.rows()
    counts = Counter(r.status for r in rows)
    report.sent, report.instances = len(rows), len({r.sop_instance_uid for r in rows})
    report.success, report.failed, report.unknown = counts[SUCCESS], counts[FAILED], counts[UNKNOWN]
    report.failure_codes = ledger.failure_codes()
    if given_up:  # docs/reliability.md: services recover once the fault is gone
        report.problems.append(
            f"recovery: {len(given_up)} instance(s) never answered Success by the time the "
            "sender gave up retrying, after the faults had stopped"
        )
    return report


def check(
    scenario: str,
    pipeline: Pipeline,
    ledger: Ledger,
    faults: Counter[str],
    poisons: list[Poison] | None = None,
    given_up: list[str] | None = None,
) -> Report:
    """Compute the figures; ``report.problems`` lists every violated property (L1-L5)."""
    poisons = poisons or []
    report = new_report(scenario, ledger, faults, given_up)
    _check_drained(pipeline, report)  # L5, first part
    settings = load_settings(ReaderSettings, pipeline.config)
    by_uid = check_objects(report, read_objects(settings), ledger)

    verify = pipeline.cli("verify")  # every index record: tag and the gateway's digest
    summary = _last_json(verify.stdout)
    if verify.returncode != 0 or summary.get("failed", 1) or summary.get("pending", 1):
        report.problems.append(f"L1: dicomflow verify: {verify.stdout[-2000:]}{verify.stderr}")
    elif summary.get("verified") != len(by_uid):
        report.problems.append(
            f"L1: verify checked {summary.get('verified')} records, storage holds "
            f"{len(by_uid)} instances"
        )

    _check_dead_letters(pipeline, poisons, report)  # L5, second part
    return report


def check_objects(
    report: Report, objects: list[_Object], ledger: Ledger
) -> dict[str, list[_Object]]:
    """L1, L2, L4 over what storage holds (every object decrypted); by SOP Instance UID."""
    report.stored_objects = len(objects)
    by_uid: dict[str, list[_Object]] = {}
    for obj in objects:
        if obj.problem:
            report.unexpected += 1
            report.problems.append(
                f"L2: object {obj.key} is not a readable instance: {obj.problem}"
            )
            continue
        by_uid.setdefault(obj.sop_instance_uid, []).append(obj)

    sent = ledger.digests()
    for uid, found in by_uid.items():  # L2, L4
        if uid not in sent:
            report.unexpected += len(found)
            report.problems.append(f"L2: {len(found)} stored object(s) of {uid} not in the ledger")
        if len(found) > 1:
            report.duplicates += len(found) - 1
            report.problems.append(f"L4: {len(found)} objects for {uid}")
        for obj in found:
            if uid in sent and obj.digest != sent[uid]:
                report.problems.append(f"L2: object {obj.key} holds other bytes than sent")

    for uid, digest in ledger.succeeded().items():  # L1
        found = by_uid.get(uid, [])
        if len(found) != 1 or found[0].digest != digest:
            report.lost += 1
            report.problems.append(
                f"L1: {uid} answered Success but {len(found)} object(s) hold its bytes"
            )
    return by_uid


def _last_json(text: str) -> dict[str, Any]:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            value: dict[str, Any] = json.loads(line)
            return value
    return {}


def read_objects(settings: ReaderSettings) -> list[_Object]:
    store = objectstore.build_store(settings.storage)
    keyring = load_keyring(settings.encryption)
    out = []
    for batch in obstore.list(store):
        for meta in batch:
            key = str(meta["path"])
            data = bytes(obstore.get(store, key).bytes())
            try:
                plain = open_bytes(keyring, data)
                uid = str(dcmread(io.BytesIO(plain), stop_before_pixels=True).SOPInstanceUID)
                out.append(_Object(key, uid, dataset_digest(plain), ""))
            except (DicomflowError, ValueError, AttributeError) as exc:
                out.append(_Object(key, "", "", f"{type(exc).__name__}: {exc}"))
    return out


def _check_drained(pipeline: Pipeline, report: Report) -> None:
    leftovers = asyncio.run(_leftovers(pipeline.nats.url))
    for what in leftovers:
        report.problems.append(f"L5: {what}")


async def _leftovers(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        out = []
        for stream in (subjects.INGEST_STREAM, subjects.SEALED_STREAM):
            info = await js.stream_info(stream)
            consumers = await js.consumers_info(stream)
            if info.state.messages:
                floors = ", ".join(
                    f"{c.name} {c.ack_floor.stream_seq if c.ack_floor else 0}" for c in consumers
                )
                out.append(
                    f"{stream} still holds {info.state.messages} message(s), sequences "
                    f"{info.state.first_seq}-{info.state.last_seq}; consumers' ack floors: "
                    f"{floors} (a message below every ack floor was acked, yet not removed)"
                )
            for consumer in consumers:
                if consumer.num_pending or consumer.num_ack_pending:
                    out.append(
                        f"consumer {consumer.name} on {stream}: {consumer.num_pending} pending, "
                        f"{consumer.num_ack_pending} unacknowledged"
                    )
        return out
    finally:
        await nc.close()


def _check_dead_letters(pipeline: Pipeline, poisons: list[Poison], report: Report) -> None:
    expected = {p.ident: p for p in poisons}
    seen: Counter[str] = Counter()
    for letter in pipeline.dead_letters():
        ident = letter.get(POISON_HEADER, "")
        reason = letter.get(DLQ_REASON, "")
        poison = expected.get(ident)
        if poison is None:
            report.dead_lettered["unexpected"] += 1
            report.problems.append(f"L5: a dead letter that was not injected: {reason[:300]}")
            continue
        seen[ident] += 1
        report.dead_lettered[poison.kind] += 1
        if poison.reason not in reason:
            report.problems.append(
                f"L5: poison {ident} dead-lettered with {reason[:300]!r}, "
                f"expected {poison.reason!r}"
            )
    for ident, poison in expected.items():
        if seen[ident] != 1:
            report.problems.append(
                f"L5: poison {ident} ({poison.kind}) is {seen[ident]} times in the DLQ, not once"
            )
