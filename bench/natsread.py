"""Micro-benchmark of nats-py's receive path: CPU per message of one subscriber process.

A nats-server (as the tests start it) holds one JetStream stream of ``--count`` messages,
each with about 1.5 KiB of headers and a ``--payload`` body (0.5 MiB: an image), published
once. Each round then starts three fresh subscriber processes in turn: ``off``, nats-py as
shipped; ``reads``, ``dicomflow.shared.patches.natsio`` without its parser buffer (1 MiB
reads only, as before issue 17's receive change); ``on``, the whole patch, as every
dicomflow connection runs. Each pulls every message through its own consumer in batches
of 16, as the stages fetch, and reports its process CPU time (``time.process_time``, all
threads) from the first fetch to the last message. Acks are off (AckPolicy NONE) so the
figure is the receive path alone.

Run under the shared lock: ``flock /tmp/dicomflow-bench.lock .venv/bin/python bench/natsread.py``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from dicomflow.embedded.natsserver import EMBEDDED_MAX_PAYLOAD, NatsServer

STREAM = "NATSREAD"
SUBJECT = "natsread.body"
BATCH = 16
FETCH_TIMEOUT = 10.0
KIB = 1024
PATCHES = ("off", "reads", "on")


def _headers() -> dict[str, str]:
    """About 1.5 KiB of headers, like a sealed message's (names, hashes, signature)."""
    headers = {f"Dicomflow-Field-{i}": "v" * 40 for i in range(20)}
    headers["Dicomflow-Signature"] = "s" * 300
    return headers


async def _publish(url: str, count: int, payload: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=STREAM, subjects=[SUBJECT], storage=StorageType.FILE))
        body = os.urandom(payload)
        for start in range(0, count, BATCH):
            await asyncio.gather(
                *(
                    js.publish(SUBJECT, body, headers={**_headers(), "Nats-Msg-Id": str(i)})
                    for i in range(start, min(start + BATCH, count))
                )
            )
    finally:
        await nc.close()


async def _subscribe(url: str, count: int, durable: str) -> dict[str, float]:
    nc = await nats.connect(url, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, max_ack_pending=-1)
        sub = await js.pull_subscribe(SUBJECT, durable=durable, config=config)
        received = nbytes = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        while received < count:
            msgs = await sub.fetch(min(BATCH, count - received), timeout=FETCH_TIMEOUT)
            received += len(msgs)
            nbytes += sum(len(m.data) for m in msgs)
        cpu, seconds = time.process_time() - cpu0, time.perf_counter() - t0
        return {"cpu_s": cpu, "seconds": seconds, "messages": received, "bytes": nbytes}
    finally:
        await nc.close()


def _subscriber(args: argparse.Namespace) -> None:
    """The child process: one consumer, patch on or off, its figures as JSON."""
    if args.patch != "off":
        from dicomflow.shared.patches import natsio
        from nats.protocol import parser

        if not natsio.install():
            raise SystemExit("the natsio patch did not install (nats-py version)")
        if args.patch == "reads":
            parser.Parser.reset = natsio._UPSTREAM_RESET  # type: ignore[method-assign]
    result = asyncio.run(_subscribe(args.url, args.count, args.durable))
    print(json.dumps(result))


def _run_subscriber(url: str, count: int, patch: str, durable: str) -> dict[str, float]:
    command = [sys.executable, __file__, "--subscriber", "--url", url, "--count", str(count)]
    command += ["--patch", patch, "--durable", durable]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    if result["messages"] != count:
        raise SystemExit(f"{patch}: received {result['messages']} of {count}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=400, help="messages per round (400)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of off, reads, on (5)")
    parser.add_argument(
        "--payload", type=int, default=512 * KIB, help="payload bytes (524288: 0.5 MiB)"
    )
    parser.add_argument("--subscriber", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--patch", choices=PATCHES, help=argparse.SUPPRESS)
    parser.add_argument("--durable", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscriber:
        _subscriber(args)
        return

    with tempfile.TemporaryDirectory() as work:
        server = NatsServer(Path(work) / "nats", max_payload=EMBEDDED_MAX_PAYLOAD)
        server.start()
        try:
            asyncio.run(_publish(server.url, args.count, args.payload))
            print(
                f"{args.count} messages of {args.payload} B payload + "
                f"{sum(len(k) + len(v) + 4 for k, v in _headers().items())} B headers; "
                "subscriber CPU ms/message (process_time):"
            )
            ms: dict[str, list[float]] = {patch: [] for patch in PATCHES}
            for n in range(args.rounds):
                row = []
                for patch in PATCHES:
                    r = _run_subscriber(server.url, args.count, patch, f"r{n}{patch}")
                    ms[patch].append(r["cpu_s"] * 1000 / args.count)
                    mib_s = r["bytes"] / r["seconds"] / (1024 * 1024)
                    row.append(f"{patch} {ms[patch][-1]:6.3f} ms ({mib_s:5.0f} MiB/s)")
                on_off, on_reads = ms["on"][-1] / ms["off"][-1], ms["on"][-1] / ms["reads"][-1]
                print(
                    f"round {n + 1}: {'  '.join(row)}  on/off {on_off:.2f} on/reads {on_reads:.2f}"
                )
        finally:
            server.stop()
    off, reads, on = (statistics.median(ms[patch]) for patch in PATCHES)
    print(
        f"median ms/message: off {off:.3f}, reads {reads:.3f}, on {on:.3f}; "
        f"on/off {on / off:.2f}, on/reads {on / reads:.2f}"
    )


if __name__ == "__main__":
    main()
