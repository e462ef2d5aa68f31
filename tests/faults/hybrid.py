"""The hybrid edge as a fault-suite target: a cloud and one site's edge (``support.hybrid``),
its leafnode link through a cuttable proxy, and the checks of docs/reliability.md over
both sides (the objects in the cloud's storage decrypted with the site's key)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import psutil
from dicomflow.shared.contracts import subjects
from dicomflow.shared.nats import natsconn
from dicomflow.shared.settings import NatsSettings

from faults.checker import Poison, Report, check_objects, new_report, read_objects
from support.hybrid import Hybrid, nats_server_pid, stored
from support.ledger import Ledger

SEALED_BLOBS = subjects.blob_stream(subjects.SEALED_BLOB_BUCKET)


class HybridTarget:
    def __init__(self, hybrid: Hybrid) -> None:
        self.hybrid = hybrid
        self.port = hybrid.dicom_port

    def kill_server(self, side: str) -> None:
        """kill -9 the nats-server of ``side`` (edge: the leaf, cloud: the hub); its
        `dicomflow edge`/`cloud` starts it again."""
        proc = self.hybrid.edge_proc if side == "edge" else self.hybrid.cloud_proc
        assert proc is not None
        psutil.Process(nats_server_pid(proc)).kill()

    def wait_drained(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while asyncio.run(self.leftovers()):
            if time.monotonic() > deadline:
                raise TimeoutError("the hybrid edge did not drain")
            time.sleep(0.5)

    def _sides(self) -> dict[str, tuple[NatsSettings, tuple[str, ...]]]:
        sealed = self.hybrid.edge_sealed().nats_sealed
        assert sealed is not None
        return {
            "edge (LOCAL)": (self.hybrid.settings("edge").nats, (subjects.INGEST_STREAM,)),
            "edge (EDGE)": (sealed, (subjects.SEALED_STREAM, SEALED_BLOBS)),
            "cloud": (
                self.hybrid.settings("cloud").nats,
                (subjects.SEALED_STREAM, SEALED_BLOBS),
            ),
        }

    async def leftovers(self) -> list[str]:
        """What is still in flight anywhere (L5): messages in the edge's INGEST, sealed
        streams and the cloud's, consumers with pending or unacknowledged work."""
        out = []
        for side, (settings, streams) in self._sides().items():
            nc = await natsconn.connect_once(settings, "faults")
            try:
                js = nc.jetstream()
                for stream in streams:
                    info = await js.stream_info(stream)
                    if info.state.messages:
                        out.append(f"{side} {stream} holds {info.state.messages} message(s)")
                    for c in await js.consumers_info(stream):
                        if c.num_pending or c.num_ack_pending:
                            out.append(
                                f"{side} {stream} consumer {c.name}: {c.num_pending} pending, "
                                f"{c.num_ack_pending} unacknowledged"
                            )
            finally:
                await nc.close()
        return out

    async def dead_letters(self) -> int:
        total = 0
        for side in ("edge", "cloud"):
            nc = await natsconn.connect_once(self.hybrid.settings(side).nats, "faults")
            try:
                info = await nc.jetstream().stream_info(subjects.DLQ_STREAM)
                total += int(info.state.messages)
            finally:
                await nc.close()
        return total


def check_hybrid(
    scenario: str,
    target: HybridTarget,
    ledger: Ledger,
    faults: Counter[str],
    poisons: list[Poison] | None = None,
    given_up: list[str] | None = None,
) -> Report:
    """L1, L2, L4 over the cloud's storage (decrypted with the site's master key), the
    cloud's index holding each stored instance once, L5 on both sides, no dead letter."""
    report = new_report(scenario, ledger, faults, given_up)
    for what in asyncio.run(target.leftovers()):
        report.problems.append(f"L5: {what}")
    by_uid = check_objects(report, read_objects(target.hybrid.settings("edge")), ledger)
    indexed = set(asyncio.run(stored(target.hybrid)))
    if indexed != set(by_uid):
        report.problems.append(
            f"L1: the cloud's index has {len(indexed)} stored record(s), storage "
            f"{len(by_uid)} instance(s); {len(indexed ^ set(by_uid))} differ"
        )
    letters = asyncio.run(target.dead_letters())
    if letters:
        report.dead_lettered["unexpected"] += letters
        report.problems.append(f"L5: {letters} dead letter(s) at the edge or in the cloud")
    return report
