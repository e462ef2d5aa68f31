"""What idle associations cost the scp-gateway, per ``scp.reactor_delay``.

For each delay a fresh pipeline (embedded nats-server, local storage) is started; N
pynetdicom associations are opened to the gateway and held idle, and the gateway's CPU
time (user + system, from /proc) over ``--seconds`` is printed as a share of one core,
then again with the associations released. Messages wake the loops whatever the delay
(shared/patches/reactors.py); the delay is an idle turn's length, and shorter costs this.
Not run in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from pynetdicom import AE  # noqa: E402
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # noqa: E402

from dicomflow.embedded.natsserver import NatsServer  # noqa: E402
from support.pipeline import Pipeline  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def core_share(pid: int, seconds: float) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / seconds


def measure(delay: float, associations: int, seconds: float) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="dicomflow-bench-idle-") as name:
        root = Path(name)
        with NatsServer(root / "jetstream") as nats:
            storage = {"backend": "local", "local_path": root / "objects"}
            extra = {"scp": {"reactor_delay": delay}}
            pipeline = Pipeline(root / "p", nats, storage, extra=extra).start()
            try:
                pid = pipeline.stages["scp-gateway"].pid
                assert pid is not None
                ae = AE(ae_title="STORESCU")
                ae.add_requested_context(Verification)
                held = [
                    ae.associate("127.0.0.1", pipeline.port, ae_title=pipeline.ae_title)
                    for _ in range(associations)
                ]
                if not all(assoc.is_established for assoc in held):
                    raise RuntimeError("the gateway refused an association")
                time.sleep(1.0)
                busy = core_share(pid, seconds)
                for assoc in held:
                    assoc.release()
                time.sleep(1.0)
                return busy, core_share(pid, seconds)
            finally:
                pipeline.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--delays",
        default="0.01,0.001",
        help="comma-separated scp.reactor_delay values in seconds (0.01,0.001)",
    )
    parser.add_argument("--associations", type=int, default=4, help="held idle (4)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured for (10)")
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",") if d.strip()]
    for delay in delays:
        held, none = measure(delay, args.associations, args.seconds)
        print(
            f"reactor_delay {delay * 1000:g} ms: gateway {held:.0%} of a core with "
            f"{args.associations} idle associations, {none:.0%} with none",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
