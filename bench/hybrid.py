"""Hybrid catch-up benchmark: how fast the cloud stores what an edge held through a cut,
against the single-zone store rate, in one run.

One run generates two synthetic CT series (N images each, 512x512x16 bit by default,
about 0.5 MiB each; the second set has new UIDs), then:

* ``single-zone``: scp-gateway -> NATS JetStream -> encryptor -> store-writer on one
  nats-server (``sync_interval: always``, as ``dicomflow up`` runs it), local storage.
  Set A is sent with DCMTK ``storescu`` over four associations; the store rate is N over
  the time from the first C-STORE sent to the last instance stored.
* ``hybrid``: `dicomflow cloud` and `dicomflow edge --join` (both servers fsync before
  acknowledging), the leafnode link through a TCP proxy. The link is cut, set B is sent to
  the edge (every C-STORE answered Success, every instance sealed and waiting in the
  edge's SEALED), then the link is restored; the catch-up rate is N over the time from
  the restore to the last instance stored in the cloud.

"Stored" is counted from each side's EVENTS stream (one ``dicom.stored`` event per
instance, published by the store-writer after the object is written and indexed), polled
every 0.1 s. Prints both rates and their ratio, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nats
from common import MIB, NATS_SYNC_INTERVAL, REPO, send, wait_log
from dicomflow.shared.contracts import subjects
from dicomflow.shared.nats import natsconn

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, ct_series
from support.hybrid import Hybrid, messages, stop
from support.linkproxy import LinkProxy
from support.pipeline import Pipeline
from support.servers import free_port

ASSOCIATIONS = 4
POLL = 0.1


def _wait(what: str, probe: Callable[[], Awaitable[int]], target: int, timeout: float) -> float:
    """Poll ``probe`` until it reaches ``target``; the wall time it was first seen there."""
    deadline = time.monotonic() + timeout
    while True:
        if asyncio.run(probe()) >= target:
            return time.time()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not {target} within {timeout:.0f} s")
        time.sleep(POLL)


def single_zone(files: list[Made], work: Path, timeout: float) -> dict[str, Any]:
    server = NatsServer(work / "nats", sync_interval=NATS_SYNC_INTERVAL)
    pipeline: Pipeline | None = None
    try:
        server.start()
        pipeline = Pipeline(work, server, {"backend": "local", "local_path": work / "objects"})
        pipeline.start()
        wait_log(pipeline, "encryptor", "encryptor ready")
        wait_log(pipeline, "store-writer", "store-writer ready")

        async def events() -> int:
            nc = await nats.connect(server.url)
            try:
                info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
                return int(info.state.messages)
            finally:
                await nc.close()

        started = time.time()
        sent = send(files, ASSOCIATIONS, pipeline.port, pipeline.ae_title, work / "scu")
        done = _wait("single zone stored", events, len(files), timeout)
        return {
            "store_seconds": round(done - started, 2),
            "store_rate": round(len(files) / (done - started), 1),
            "storescu_exit_codes": sent.returncodes,
            "success": sum(st.startswith("Success") for st in sent.statuses),
        }
    finally:
        if pipeline is not None:
            pipeline.stop()
        server.stop()


def hybrid(files: list[Made], work: Path, timeout: float) -> dict[str, Any]:
    leafnode_port = free_port()
    with LinkProxy(leafnode_port) as proxy:
        setup = Hybrid(
            work, proxy, leafnode_port, free_port(), site="bench", calling_aes=("STORESCU",)
        )
        setup.add_site()
        try:
            setup.start_cloud()
            setup.start_edge()

            async def sealed_at_edge() -> int:
                return await messages(setup, "edge-sealed", subjects.SEALED_STREAM)

            async def stored_in_cloud() -> int:
                nc = await natsconn.connect_once(setup.settings("cloud").nats, "bench")
                try:
                    info = await nc.jetstream().stream_info(subjects.EVENTS_STREAM)
                    return int(info.state.messages)
                finally:
                    await nc.close()

            proxy.cut()
            started = time.time()
            sent = send(files, ASSOCIATIONS, setup.dicom_port, "DICOMFLOW", work / "scu")
            sealed = _wait("sealed at the edge", sealed_at_edge, len(files), timeout)
            held = asyncio.run(stored_in_cloud())
            time.sleep(2)
            restored = time.time()
            proxy.restore()
            done = _wait("caught up", stored_in_cloud, len(files), timeout)
            return {
                "ingest_while_cut_seconds": round(sealed - started, 2),
                "stored_in_cloud_during_cut": held,
                "catch_up_seconds": round(done - restored, 2),
                "catch_up_rate": round(len(files) / (done - restored), 1),
                "storescu_exit_codes": sent.returncodes,
                "success": sum(st.startswith("Success") for st in sent.statuses),
            }
        finally:
            proxy.restore()
            for proc in (setup.edge_proc, setup.cloud_proc):
                if proc is not None:
                    stop(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Catch-up rate of the hybrid edge after a cut against the single-zone "
        "store rate (one run; prints both and their ratio, writes JSON)."
    )
    parser.add_argument("--count", type=int, default=1000, help="images per set (1000)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns (512)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per wait (900)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "hybrid.json",
        help="JSON results file (bench/results/hybrid.json)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    if args.count < ASSOCIATIONS:
        parser.error(f"--count must be at least {ASSOCIATIONS}")
    root = Path(tempfile.mkdtemp(prefix="dicomflow-bench-hybrid-"))
    try:
        t = time.monotonic()
        set_a = ct_series(root / "files-a", args.count, rows=args.size, columns=args.size)
        set_b = ct_series(root / "files-b", args.count, rows=args.size, columns=args.size)
        size = sum(f.path.stat().st_size for f in set_a) / args.count / MIB
        print(
            f"generated 2 x {args.count} CT images {args.size}x{args.size}x16 "
            f"({size:.2f} MiB each) in {time.monotonic() - t:.1f} s; work folder {root}",
            flush=True,
        )
        (root / "single").mkdir()
        single = single_zone(set_a, root / "single", args.timeout)
        print(f"single zone: {single}", flush=True)
        (root / "hybrid").mkdir()
        caught = hybrid(set_b, root / "hybrid", args.timeout)
        print(f"hybrid: {caught}", flush=True)
        ratio = caught["catch_up_rate"] / single["store_rate"]
        result = {
            "count": args.count,
            "image_mib": round(size, 3),
            "associations": ASSOCIATIONS,
            "single_zone": single,
            "hybrid": caught,
            "catch_up_to_single_zone": round(ratio, 2),
        }
        print(
            f"\nsingle-zone store rate: {single['store_rate']} images/s "
            f"({args.count} in {single['store_seconds']} s)\n"
            f"hybrid catch-up rate:   {caught['catch_up_rate']} images/s "
            f"({args.count} in {caught['catch_up_seconds']} s after the link returned)\n"
            f"ratio catch-up / single zone: {ratio:.2f}",
            flush=True,
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
