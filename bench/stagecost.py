"""Micro-benchmark: Python CPU per inline message in the encryptor's and the
store-writer's handlers (issue 17), without the consumer loop or DCMTK.

A real nats-server (embedded, on a free port) holds the streams, the index KV and the
SEALED messages the encryptor publishes; the handlers run in this process on deliveries
decoded as the consumer decodes them, ``--batch`` at a time through
``delivery.concurrently`` (as the stages run them). The store-writer writes to obstore's
MemoryStore (``--store memory``) or a local folder, fsynced (``--store local``).

CPU is this process's (every thread: ``time.process_time``) over the timed messages,
divided by their count; nats-server's own CPU is not in it. Best of ``--rounds``. The
same script runs on an older checkout (it uses the handlers' public seams only), for an
A/B of a change:

    flock /tmp/dicomflow-bench.lock .venv/bin/python bench/stagecost.py --count 300
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

import nats  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from dicomflow.encryptor.service import Encryptor  # noqa: E402
from dicomflow.shared.contracts.messages import Instance  # noqa: E402
from dicomflow.shared.crypto.envelope import seal  # noqa: E402
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey  # noqa: E402
from dicomflow.shared.crypto.sealsign import SealSigner, SealVerifier  # noqa: E402
from dicomflow.shared.nats import topology  # noqa: E402
from dicomflow.shared.nats.transport import Transport  # noqa: E402
from dicomflow.shared.settings import NatsSettings, StorageSettings  # noqa: E402
from dicomflow.shared.stage import delivery  # noqa: E402
from dicomflow.shared.stage.delivery import Delivery  # noqa: E402
from dicomflow.shared.storage import objectstore  # noqa: E402
from dicomflow.shared.storage.index import Index  # noqa: E402
from dicomflow.shared.telemetry.bundle import Telemetry  # noqa: E402
from dicomflow.shared.telemetry.tracing import Tracing  # noqa: E402
from dicomflow.store_writer.service import StoreWriter  # noqa: E402
from dicomflow.store_writer.settings import DuplicatePolicy  # noqa: E402
from obstore.store import MemoryStore  # noqa: E402

from dicomflow.embedded.natsserver import NatsServer  # noqa: E402
from support.stage import ingest_message, instance, sealed_message  # noqa: E402

KEY = MasterKey(1, os.urandom(32))
SIGNING = Ed25519PrivateKey.generate()
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"


async def timed(
    batches: Sequence[Sequence[Delivery[Instance]]],
    handle: Callable[[Sequence[Delivery[Instance]]], Awaitable[Sequence[delivery.Outcome]]],
) -> tuple[float, float]:
    """CPU and wall ms per message of ``handle`` over ``batches``; raises on a failure."""
    count = sum(len(batch) for batch in batches)
    cpu, wall = time.process_time(), time.perf_counter()
    for batch in batches:
        for outcome in await handle(batch):
            if outcome.error is not None:
                raise outcome.error
    return (
        (time.process_time() - cpu) * 1000 / count,
        (time.perf_counter() - wall) * 1000 / count,
    )


def cut(items: list[Delivery[Instance]], size: int) -> list[list[Delivery[Instance]]]:
    return [items[at : at + size] for at in range(0, len(items), size)]


async def run(args: argparse.Namespace, folder: Path) -> None:
    with NatsServer(folder / "jetstream") as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await topology.ensure(js, NatsSettings(servers=[server.url]))
        transport = Transport(nc, js, publish_timeout=10.0)
        if args.size + 64 > transport.inline_limit:
            sys.exit(f"--size {args.size} is not inline here (limit {transport.inline_limit})")
        encryptor = Encryptor(transport, KeyRing(KEY), SealSigner(SIGNING), Tracing("bench"))
        if args.store == "local":
            storage = StorageSettings(local_path=folder / "objects")
            store = objectstore.build_store(storage)
        else:
            storage, store = StorageSettings(), MemoryStore()
        writer = StoreWriter(
            js,
            transport,
            await Index.open(js),
            store,
            storage,
            DuplicatePolicy.REJECT,
            10.0,
            Telemetry.create("bench"),
            SealVerifier([SIGNING.public_key()]),
        )
        signer = SealSigner(SIGNING)
        seal_handle = delivery.concurrently(encryptor.handle)
        store_handle = delivery.concurrently(writer.handle)
        print(
            f"{args.count} inline messages of {args.size} bytes, batches of {args.batch}, "
            f"store {args.store}; CPU ms/message (all threads of this process), best of "
            f"{args.rounds}",
            flush=True,
        )
        best: dict[str, tuple[float, float]] = {}
        serial = 0
        for _ in range(args.rounds):
            ingest, sealed = [], []
            for _ in range(args.count):
                serial += 1
                plain = os.urandom(args.size)
                inst = instance(plain, f"{UID_ROOT}.{serial}")
                ingest.append(
                    delivery.deliver(delivery.ingest(transport), ingest_message(inst, plain))
                )
                body = seal(KEY, plain)
                out = signer.sign(
                    inst.sealed(KEY.key_id, len(body), hashlib.sha256(body).hexdigest())
                )
                sealed.append(
                    delivery.deliver(delivery.sealed(transport), sealed_message(out, body))
                )
            for name, items, handle in (
                ("encryptor", ingest, seal_handle),
                ("store-writer", sealed, store_handle),
            ):
                got = await timed(cut(items, args.batch), handle)
                best[name] = min(best.get(name, got), got)
        for name, (cpu, wall) in best.items():
            print(f"{name:13s} CPU {cpu:6.3f} ms/message   wall {wall:6.3f} ms/message")
        await nc.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=300, help="messages per round (300)")
    parser.add_argument("--size", type=int, default=512 * 1024, help="plaintext bytes (524288)")
    parser.add_argument("--batch", type=int, default=8, help="deliveries handled at once (8)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best counts (3)")
    parser.add_argument(
        "--store", choices=("memory", "local"), default="memory", help="store-writer's store"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dicomflow-stagecost-") as folder:
        asyncio.run(run(args, Path(folder)))


if __name__ == "__main__":
    main()
