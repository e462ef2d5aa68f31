"""Forwarding benchmark: dicomflow's scu-gateway vs DCMTK storescu, into one Orthanc.

One run generates two synthetic CT series of N images (512x512x16 bit by default,
Explicit VR Little Endian, different UIDs) and starts one Orthanc (default SQLite index
and filesystem storage, TCP_NODELAY=1):

* ``storescu``: DCMTK's storescu sends set A to Orthanc over one association.
* ``dicomflow``: set B is first ingested through the pipeline (scp-gateway, encryptor,
  store-writer; local storage) and ``dicomflow send --to ORTHANC --study`` queues its N
  delivery requests, neither timed. Only then does the scu-gateway start: it reads each
  object from storage, decrypts and verifies it, and C-STOREs it over
  ``--associations`` reused association(s). (Queueing while the scu-gateway ran made
  the queueing command's rate part of the figure: the gateway waited for requests.)

Both rates are (N-1) over the time from the first to the last new instance counted by
Orthanc's ``/statistics`` (polled every 10 ms). Prints images/s for both and their
ratio, and the CPU each process spent per image over that same window (user + system,
from /proc): Orthanc's under each sender, storescu's, the scu-gateway's and
nats-server's. On a 2-core host a sender shares the cores with Orthanc, so its CPU
shows in Orthanc's rate too. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds  # noqa: E402

from dicomflow.embedded.natsserver import NatsServer  # noqa: E402
from support.dicomfiles import ct_series  # noqa: E402
from support.orthanc import Orthanc  # noqa: E402
from support.pipeline import SCU_STAGE, STAGES, STORESCU, Pipeline  # noqa: E402


def count(orthanc: Orthanc) -> int:
    return int(orthanc.get("/statistics")["CountInstances"])


class Window:
    """The CPU seconds of some processes between two points in time."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self._pids = pids
        self._start: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        found = {name: cpu_seconds(pid) if pid else None for name, pid in self._pids.items()}
        return {name: seconds for name, seconds in found.items() if seconds is not None}

    def start(self) -> None:
        self._start = self._now()

    def ms_per_image(self, images: int) -> dict[str, float]:
        end = self._now()
        return {
            name: round(1000 * (end[name] - self._start[name]) / images, 2)
            for name in self._start
            if name in end
        }


def arrivals(
    orthanc: Orthanc, base: int, n: int, window: Window, timeout: float = 600
) -> tuple[float, dict[str, float]]:
    """Seconds from the first to the last of ``n`` new instances counted by Orthanc, and
    the CPU milliseconds per image the window's processes spent meanwhile.

    The same clock for both senders: process start-up, association set-up and (for
    dicomflow) queueing the requests fall before the first arrival and are left out.
    """
    deadline = time.monotonic() + timeout
    first = None
    while True:
        now, seen = time.monotonic(), count(orthanc) - base
        if first is None and seen >= 1:
            first = now
            window.start()
        if seen >= n and first is not None:
            return now - first, window.ms_per_image(n - 1)
        if now > deadline:
            raise TimeoutError(f"Orthanc has {seen} of {n}")
        time.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=300, help="images per set (300)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns (512)")
    parser.add_argument("--associations", type=int, default=1, help="scu-gateway's (1)")
    args = parser.parse_args()
    n = args.count
    with tempfile.TemporaryDirectory(prefix="dicomflow-bench-fwd-") as tmp_name:
        tmp = Path(tmp_name)
        set_a = ct_series(tmp / "a", n, rows=args.size, columns=args.size)
        set_b = ct_series(tmp / "b", n, rows=args.size, columns=args.size)
        mib = sum(f.path.stat().st_size for f in set_a) / 2**20
        with Orthanc(tmp / "orthanc", peers=("DICOMFLOW", "STORESCU")) as orthanc:
            proc = subprocess.Popen(
                [
                    STORESCU,
                    "-aet",
                    "STORESCU",
                    "-aec",
                    orthanc.ae_title,
                    "127.0.0.1",
                    str(orthanc.dicom_port),
                    *[str(f.path) for f in set_a],
                ],
                env=dict(os.environ, TCP_NODELAY="1"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            window = Window({"orthanc": orthanc.pid, "storescu": proc.pid})
            storescu_s, storescu_cpu = arrivals(orthanc, 0, n, window)
            _, err = proc.communicate()
            if proc.returncode != 0 or count(orthanc) != n:
                raise RuntimeError(f"storescu failed:\n{err[-2000:]}")

            with NatsServer(tmp / "jetstream") as nats:
                scu = {
                    "destinations": {
                        "ORTHANC": {
                            "ae_title": orthanc.ae_title,
                            "host": "127.0.0.1",
                            "port": orthanc.dicom_port,
                            "max_associations": args.associations,
                        }
                    }
                }
                storage = {"backend": "local", "local_path": tmp / "objects"}
                pipeline = Pipeline(tmp / "p", nats, storage, scu=scu).start(*STAGES)
                try:
                    sent = pipeline.send(set_b)
                    if sent.statuses() != ["Success"] * n:
                        raise RuntimeError("ingest failed:\n" + sent.output[-2000:])
                    pipeline.wait_stored(n, timeout=600)
                    started = time.monotonic()
                    queued = subprocess.run(
                        [
                            *(sys.executable, "-m", "dicomflow", "send", "--to", "ORTHANC"),
                            *("--study", set_b[0].study_uid, "--config", str(pipeline.config)),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    queue_s = time.monotonic() - started
                    if queued.returncode != 0:
                        raise RuntimeError(queued.stderr)
                    pipeline.start(SCU_STAGE)
                    window = Window(
                        {
                            "orthanc": orthanc.pid,
                            "scu_gateway": pipeline.stages[SCU_STAGE].pid,
                            "nats_server": nats.pid,
                        }
                    )
                    forward_s, forward_cpu = arrivals(orthanc, n, n, window)
                finally:
                    pipeline.stop()
    result = {
        "images": n,
        "image_mib": round(mib / n, 3),
        "storescu_images_per_s": round((n - 1) / storescu_s, 1),
        "dicomflow_images_per_s": round((n - 1) / forward_s, 1),
        "dicomflow_associations": args.associations,
        "ratio": round(storescu_s / forward_s, 3),
        "queueing_requests_per_s": round(n / queue_s, 1),
        "cpu_ms_per_image": {"storescu": storescu_cpu, "dicomflow": forward_cpu},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
