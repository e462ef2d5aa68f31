"""Large-object benchmark: one 2 GiB + 1 B instance and a batch of 100 MiB instances.

One run:

1. generates a multi-frame-like instance (Multi-frame Grayscale Byte Secondary Capture,
   Explicit VR Little Endian) whose Pixel Data (OB) holds ``--big-bytes`` pseudo-random
   bytes, written in 64 MiB pieces (never whole in memory), and ``--batch`` instances of
   ``--batch-mib`` MiB of Pixel Data;
2. sends, with DCMTK ``storescu`` over ONE association, the big instance and then the
   batch to each target, on 127.0.0.1:

   * ``storescp``: DCMTK's storescp writing files (``-od DIR``), as is (it receives a
     dataset into memory, then writes it) and, unless ``--storescp-modes`` says
     otherwise, with ``+B`` (bit-preserving: written to disk as it arrives);
   * ``dicomflow``: scp-gateway -> NATS JetStream -> encryptor -> store-writer with local
     storage (tests/support/pipeline.Pipeline against an embedded nats-server);

3. prints per target and phase the throughput (decimal MB of the files' bytes per
   second) and the peak RSS of every server process, with PASS/FAIL against the targets
   of issue 17: every dicomflow service below 300 MiB peak RSS, and large-object
   throughput (all stored) at least 0.35 of storescp's (issue 3 asked 0.5; issue 17
   set 0.35 with nats-server fsyncing before each acknowledgement, as ``up`` runs it);
4. fetches the big instance back with ``dicomflow get`` and compares the SHA-256 of its
   dataset (the bytes after the File Meta Information) with the sent file's, streaming,
   and reports the peak RSS of that ``get``.

Times come from storescu's log (microsecond timestamps): a C-STORE runs from its "Sending
Store Request" to its "Received Store Response". For dicomflow, "gateway ack" is that
response and "all stored" is when the ``dicom.stored`` event of the instance reached a
NATS subscriber in this process. The batch is sent while dicomflow may still be busy
with the big instance: its "all stored" time runs from its first request, waiting
included; the time from the big instance's stored event is given too.

Peak RSS is VmHWM from /proc/<pid>/status, read every 50 ms and at the end (exact, as the
kernel keeps it). When the big instance is done (storescp: its C-STORE response;
dicomflow: its stored event) the peak so far is recorded and reset (``clear_refs`` 5), so
the peak is also given per window: "big" (until then) and "batch" (after). storescu's and
``dicomflow get``'s peaks come from GNU time (``/usr/bin/time -f %M``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import (
    DCMTK_ENV,
    MIB,
    NATS_SYNC_INTERVAL,
    REPO,
    STORESCP,
    STORESCU,
    SendResult,
    StoredListener,
    cpu_seconds,
    log_problems,
    peak_rss_kib,
    proc_status,
    send,
    status_kib,
    terminate,
    timed,
    version_of,
    wait_listening,
    wait_log,
)
from pydicom.uid import MultiFrameGrayscaleByteSecondaryCaptureImageStorage

from dicomflow.embedded.natsserver import EMBEDDED_MAX_PAYLOAD, NatsServer
from support.dicomfiles import Made, dataset, made, with_pixel_bytes, write
from support.pipeline import Pipeline
from support.servers import free_port

GIB = 1024 * MIB
RSS_TARGET_MIB = 300.0
THROUGHPUT_TARGET = 0.35  # dicomflow all-stored MB/s over storescp's (issue 17)
DICOMFLOW_PROCS = ("scp-gateway", "encryptor", "store-writer", "nats-server")
PIECE = 64 * MIB


# -- files ----------------------------------------------------------------------------
def make_big(path: Path, pixel_bytes: int, *, seed: int = 1000) -> Made:
    """A Part-10 file whose Pixel Data (OB, last element) holds ``pixel_bytes``
    pseudo-random bytes (plus one pad byte when odd), written piece by piece."""
    ds = dataset(
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        modality="OT",
        rows=1,
        columns=1,
        bits=8,
        seed=seed,
    )
    del ds.PixelData
    side = 1024 if pixel_bytes >= MIB else 1
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = max(pixel_bytes // (side * side), 1)  # nominal: a benchmark body
    write(ds, path)
    padded = pixel_bytes + (pixel_bytes & 1)
    if padded > 0xFFFFFFFE:
        raise ValueError(f"{pixel_bytes} bytes do not fit a defined-length OB value")
    rng = np.random.default_rng(seed)
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, padded))
        left = pixel_bytes
        while left:
            n = min(left, PIECE)
            f.write(rng.bytes(n))
            left -= n
        if pixel_bytes & 1:
            f.write(b"\0")
    return made(path)


def dataset_sha256(path: Path) -> tuple[str, int]:
    """SHA-256 and length of the bytes after the File Meta Information, streaming."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        head = f.read(132 + 12)
        if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
            raise ValueError(f"{path} is not a Part-10 file with a group length first")
        f.seek(132 + 12 + struct.unpack_from("<I", head, 140)[0])
        while chunk := f.read(8 * MIB):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


# -- memory ---------------------------------------------------------------------------
@dataclass
class Peaks:
    """Peak RSS (KiB) of one process: until the big object is done, after, overall."""

    big: int = 0
    batch: int = 0
    reset: bool = False  # the kernel's peak was reset at the boundary (exact windows)
    sampled_batch: int = 0  # max VmRSS sampled after the boundary (fallback)

    @property
    def overall(self) -> int:
        return max(self.big, self.batch)


@dataclass
class WindowSampler:
    """VmHWM of each process; at ``boundary()`` the peak so far is kept and reset."""

    pids: dict[str, int]
    boundary: Callable[[], float | None]
    interval: float = 0.05
    peaks: dict[str, Peaks] = field(default_factory=dict)
    boundary_at: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.peaks = {label: Peaks() for label in self.pids}
        self._cpu0 = {label: cpu_seconds(pid) for label, pid in self.pids.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> WindowSampler:
        self._sample()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        crossing = False
        if self.boundary_at is None and self.boundary() is not None:
            self.boundary_at, crossing = time.time(), True
        for label, pid in self.pids.items():
            status = proc_status(pid)
            if not status:
                continue
            peak, rss = self.peaks[label], status_kib(status, "VmHWM")
            if self.boundary_at is None or crossing:
                peak.big = max(peak.big, rss)
            else:
                peak.batch = max(peak.batch, rss if peak.reset else 0)
                peak.sampled_batch = max(peak.sampled_batch, status_kib(status, "VmRSS"))
            if crossing:
                try:
                    Path(f"/proc/{pid}/clear_refs").write_text("5")
                    peak.reset = True
                except OSError:
                    peak.reset = False

    def finish(self) -> dict[str, Peaks]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._sample()
        for label, pid in self.pids.items():
            now, then = cpu_seconds(pid), self._cpu0.get(label)
            if now is not None and then is not None:
                self.cpu[label] = round(now - then, 2)
            peak = self.peaks[label]
            if not peak.reset:
                peak.batch = peak.sampled_batch
        return self.peaks


def first_response_in(log_path: Path) -> Callable[[], float | None]:
    """When storescu's log first shows a Store Response (the big object is done)."""

    def check() -> float | None:
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            return None
        return time.time() if "Received Store Response" in text else None

    return check


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


# -- targets --------------------------------------------------------------------------
def timing(sent: SendResult, big: Made, batch: list[Made]) -> dict[str, Any]:
    requests = sent.logs[0].requests if sent.logs else []
    out: dict[str, Any] = {
        "returncode": sent.returncodes[0] if sent.returncodes else None,
        "statuses": sent.statuses,
        "max_send_pdv": sent.logs[0].max_send_pdv if sent.logs else None,
        "storescu_max_rss_mib": mib(rss) if (rss := next(iter(sent.max_rss_kib), None)) else None,
        "requests": requests,
    }
    if requests and requests[0][1] is not None:
        out["big_ack_s"] = requests[0][1] - requests[0][0]
    if len(requests) == len(batch) + 1 and requests[-1][1] is not None:
        out["batch_ack_s"] = requests[-1][1] - requests[1][0]
    return out


def run_storescp(mode: str, big: Made, batch: list[Made], work: Path) -> dict[str, Any]:
    out_dir = work / "received"
    out_dir.mkdir(parents=True)
    port = free_port()
    flags = ["+B"] if mode == "bit-preserving" else []
    args = [STORESCP, *flags, "-od", str(out_dir), str(port)]
    scu_dir = work / "scu"
    proc = sampler = None
    result: dict[str, Any] = {"target": f"storescp{' +B' if flags else ''}", "args": args[:-2]}
    with (work / "storescp.log").open("wb") as log:
        try:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV, start_new_session=True
            )
            wait_listening(port, proc)
            sampler = WindowSampler(
                {"storescp": proc.pid}, first_response_in(scu_dir / "storescu-0.log")
            ).start()
            sent = send([big, *batch], 1, port, "ANY-SCP", scu_dir, timeout=3600)
            peaks = sampler.finish()
        finally:
            if sampler is not None:
                sampler.finish()
            terminate(proc, group=True)
    result.update(timing(sent, big, batch))
    result["peaks"] = peaks
    result["cpu_s"] = sampler.cpu
    files = sorted(out_dir.iterdir(), key=lambda p: p.stat().st_size)
    result["received_files"] = len(files)
    if files:
        result["big_dataset_sha256"] = dataset_sha256(files[-1])[0]
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def run_dicomflow(
    big: Made, batch: list[Made], work: Path, args: argparse.Namespace, big_digest: str
) -> dict[str, Any]:
    total = sum(f.path.stat().st_size for f in [big, *batch])
    # As `up` runs it: fsync before each acknowledgement, and its max_payload (which
    # bounds the blob chunk size; the server's default, 1 MiB, would make 4 times as many).
    server = NatsServer(
        work / "nats", sync_interval=NATS_SYNC_INTERVAL, max_payload=EMBEDDED_MAX_PAYLOAD
    )
    pipeline: Pipeline | None = None
    listener: StoredListener | None = None
    sampler: WindowSampler | None = None
    result: dict[str, Any] = {"target": "dicomflow"}
    spool = work / "spool"
    spool.mkdir(parents=True)
    saved = os.environ.get("DICOMFLOW_SPOOL_DIR")
    try:
        server.start()
        os.environ["DICOMFLOW_SPOOL_DIR"] = str(spool)  # read by Pipeline's stage_env
        pipeline = Pipeline(
            work,
            server,
            {"backend": "local", "local_path": work / "objects"},
            # dicomflow's defaults rather than the tests' short timeouts, and room for
            # every blob of the run (plaintext and sealed) at once.
            extra={
                "nats": {
                    "publish_timeout": args.publish_timeout,
                    "blob_max_bytes": max(16 * GIB, 3 * total),
                    "ingest_max_bytes": 4 * GIB,
                },
                "consumer": {"ack_wait": 30.0, "backoff_initial": 1.0, "backoff_max": 60.0},
            },
        )
        pipeline.start()
        wait_log(pipeline, "encryptor", "encryptor ready")
        wait_log(pipeline, "store-writer", "store-writer ready")
        listener = StoredListener(server.url).start()
        pids = {"nats-server": server.pid}
        for name, stage in pipeline.stages.items():
            assert stage.pid is not None
            pids[name] = stage.pid
        stored_times = listener.times
        sampler = WindowSampler(pids, lambda: stored_times.get(big.sop_instance_uid)).start()
        sent = send([big, *batch], 1, pipeline.port, pipeline.ae_title, work / "scu", timeout=3600)
        expected = {f.sop_instance_uid for f in [big, *batch]}
        result["all_stored_events"] = listener.wait(expected, args.timeout)
        result["peaks"] = sampler.finish()
        result["cpu_s"] = sampler.cpu
        result.update(timing(sent, big, batch))
        times = dict(listener.times)
        requests = result["requests"]
        if big.sop_instance_uid in times and requests:
            result["big_stored_s"] = times[big.sop_instance_uid] - requests[0][0]
        batch_times = [times.get(f.sop_instance_uid) for f in batch]
        if batch and all(batch_times) and len(requests) == len(batch) + 1:
            last = max(t for t in batch_times if t is not None)
            result["batch_stored_s"] = last - requests[1][0]
            if big.sop_instance_uid in times and last > times[big.sop_instance_uid]:
                start = max(requests[1][0], times[big.sop_instance_uid])
                result["batch_stored_after_big_s"] = last - start
            if big.sop_instance_uid in times:
                result["batch_stored_before_big"] = sum(
                    1 for t in batch_times if t is not None and t <= times[big.sop_instance_uid]
                )
        stored = pipeline.wait_stored(len(expected), timeout=30)
        result["index_stored"] = sum(1 for sop in stored if sop in expected)
        result["index_sha256_big"] = stored.get(big.sop_instance_uid, {}).get("sha256")
        result["dead_letters"] = len(pipeline.dead_letters())
        if big.sop_instance_uid in stored:
            result["get"] = fetch_big(pipeline, big, work, big_digest, args.timeout)
        result["nats_warnings"] = [
            line
            for line in list(getattr(server, "_lines", []))
            if "[WRN]" in line or "[ERR]" in line
        ][:10]
    finally:
        if saved is None:
            os.environ.pop("DICOMFLOW_SPOOL_DIR", None)
        else:
            os.environ["DICOMFLOW_SPOOL_DIR"] = saved
        if sampler is not None:
            sampler.finish()
        if listener is not None:
            listener.stop()
        if pipeline is not None:
            pipeline.stop()
        server.stop()
    result["log_problems"] = log_problems(pipeline) if pipeline is not None else {}
    result["logs"] = str(work / "logs")
    return result


def fetch_big(
    pipeline: Pipeline, big: Made, work: Path, big_digest: str, timeout: float
) -> dict[str, Any]:
    """`dicomflow get` of the big instance: time, peak RSS, dataset digest."""
    out = work / "get" / "big.dcm"
    out.parent.mkdir(parents=True)
    cmd = [
        sys.executable,
        *("-m", "dicomflow", "get", "--config", str(pipeline.config)),
        *(big.sop_instance_uid, "-o", str(out)),
    ]
    t = time.monotonic()
    with (work / "get.log").open("wb") as log:
        proc = subprocess.Popen(timed(cmd, work / "get.rss"), stdout=log, stderr=log)
        try:
            code = proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.monotonic() - t
    rss = peak_rss_kib(work / "get.rss")
    got: dict[str, Any] = {
        "returncode": code,
        "seconds": round(seconds, 2),
        "max_rss_mib": mib(rss) if rss is not None else None,
        "output": (work / "get.log").read_text(errors="replace")[-2000:],
    }
    if code == 0 and out.exists():
        got["mb_per_s"] = round(out.stat().st_size / 1e6 / seconds, 1)
        got["dataset_sha256"], got["dataset_bytes"] = dataset_sha256(out)
        got["identical"] = got["dataset_sha256"] == big_digest
        out.unlink()
    return got


# -- reporting ------------------------------------------------------------------------
def _rate(size: int, seconds: float | None) -> float | None:
    return round(size / 1e6 / seconds, 1) if seconds else None


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _v(x: Any) -> str:
    return "-" if x is None else str(x)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def report(
    results: list[dict[str, Any]], big_size: int, batch_size: int, batch_count: int
) -> dict[str, Any]:
    """Print the tables; return the summary (rates, ratios, verdicts) for the JSON."""
    for r in results:
        r["mb_per_s"] = {
            "big_ack": _rate(big_size, r.get("big_ack_s")),
            "batch_ack": _rate(batch_size, r.get("batch_ack_s")),
            "big_stored": _rate(big_size, r.get("big_stored_s")),
            "batch_stored": _rate(batch_size, r.get("batch_stored_s")),
            "batch_stored_after_big": _rate(batch_size, r.get("batch_stored_after_big_s")),
        }
    print(
        f"\nThroughput (decimal MB of file bytes / s; big = 1 x {big_size / 1e6:.1f} MB, "
        f"batch = {batch_count} x {batch_size / batch_count / 1e6:.1f} MB):"
    )
    head = (
        f"{'target':<13}{'phase':<7}{'ack s':>9}{'ack MB/s':>10}{'stored s':>10}"
        f"{'stored MB/s':>12}  statuses"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        ok = sum(1 for s in r.get("statuses", []) if s == "Success")
        for phase in ("big", "batch"):
            stored_s = r.get(f"{phase}_stored_s")
            print(
                f"{r['target']:<13}{phase:<7}{_s(r.get(f'{phase}_ack_s')):>9}"
                f"{_v(r['mb_per_s'][f'{phase}_ack']):>10}"
                f"{_s(stored_s) if r['target'] == 'dicomflow' else '(= ack)':>10}"
                f"{_v(r['mb_per_s'][f'{phase}_stored']) if r['target'] == 'dicomflow' else '':>12}"
                + (
                    f"  {ok}/{len(r.get('requests', []))} Success, rc {r.get('returncode')}"
                    if phase == "big"
                    else ""
                )
            )
    flow = next((r for r in results if r["target"] == "dicomflow"), None)
    if flow and flow.get("batch_stored_after_big_s"):
        print(
            f"  dicomflow batch counted from the big object's stored event: "
            f"{flow['batch_stored_after_big_s']:.2f} s, "
            f"{flow['mb_per_s']['batch_stored_after_big']} MB/s "
            f"({flow.get('batch_stored_before_big')} of the batch stored before it)"
        )

    summary: dict[str, Any] = {"ratios": {}, "verdicts": {}}
    print(
        "\nRatios (dicomflow all-stored MB/s / storescp MB/s; 'big' is the big object end "
        f"to end; target >= {THROUGHPUT_TARGET}):"
    )
    for ref in (r for r in results if r["target"].startswith("storescp")):
        for phase in ("big", "batch"):
            ours = flow["mb_per_s"][f"{phase}_stored"] if flow else None
            theirs = ref["mb_per_s"][f"{phase}_ack"]
            ack = flow["mb_per_s"][f"{phase}_ack"] if flow else None
            ratio = round(ours / theirs, 3) if ours and theirs else None
            ack_ratio = round(ack / theirs, 3) if ack and theirs else None
            key = f"{phase} vs {ref['target']}"
            summary["ratios"][key] = {"all_stored": ratio, "gateway_ack": ack_ratio}
            ok = None if ratio is None else ratio >= THROUGHPUT_TARGET
            summary["verdicts"][f"throughput {key}"] = verdict(ok)
            print(
                f"  {key:<26} all stored {_v(ratio):>6}  {verdict(ok):<4}"
                f"   (gateway ack {_v(ack_ratio)})"
            )

    print(
        f"\nPeak RSS (VmHWM, MiB) until the big object is done / after (batch) / overall; "
        f"dicomflow target < {RSS_TARGET_MIB:.0f} MiB:"
    )
    print(f"  {'process':<22}{'big':>8}{'batch':>8}{'overall':>9}  target")
    for r in results:
        for label, peak in r.get("peaks", {}).items():
            name = f"{label} (+B)" if r["target"] == "storescp +B" else label
            service = r["target"] == "dicomflow" and label in DICOMFLOW_PROCS
            ok = mib(peak.overall) < RSS_TARGET_MIB if service else None
            marks = (
                f"big {verdict(mib(peak.big) < RSS_TARGET_MIB)}, "
                f"batch {verdict(mib(peak.batch) < RSS_TARGET_MIB)}"
                if service
                else "(reference)"
            )
            if service:
                summary["verdicts"][f"rss {label}"] = verdict(ok)
            exact = "" if peak.reset else " (batch sampled)"
            print(
                f"  {name:<22}{mib(peak.big):>8}{mib(peak.batch):>8}{mib(peak.overall):>9}"
                f"  {verdict(ok) if service else '':<4} {marks}{exact}"
            )
    for r in results:
        if r.get("storescu_max_rss_mib") is not None:
            print(
                f"  {'storescu -> ' + r['target']:<22}{'':>16}{r['storescu_max_rss_mib']:>9}"
                "  (sender, GNU time)"
            )
    got = flow.get("get") if flow else None
    if got:
        ok = got["max_rss_mib"] is not None and got["max_rss_mib"] < RSS_TARGET_MIB
        summary["verdicts"]["rss dicomflow get"] = verdict(ok)
        print(
            f"  {'dicomflow get (big)':<22}{'':>16}{_v(got['max_rss_mib']):>9}  "
            f"{verdict(ok)} (GNU time)"
        )
    if flow:
        print(
            "\nCPU seconds during the run: "
            + ", ".join(f"{k} {v}" for k, v in flow.get("cpu_s", {}).items())
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Large-object benchmark (issue 3): a 2 GiB + 1 B instance and a batch of "
            "100 MiB instances, sent by DCMTK storescu over one association to DCMTK "
            "storescp and to the dicomflow pipeline (local storage); prints throughput, "
            "peak RSS per process and PASS/FAIL against the targets, and checks the big "
            "instance round-trips through `dicomflow get`."
        )
    )
    parser.add_argument(
        "--big-bytes",
        type=int,
        default=2 * GIB + 1,
        help="Pixel Data bytes of the big instance (2147483649; odd gets a pad byte)",
    )
    parser.add_argument("--batch", type=int, default=5, help="instances in the batch (5)")
    parser.add_argument(
        "--batch-mib", type=int, default=100, help="Pixel Data MiB of each batch instance (100)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "large.json",
        help="JSON results file (bench/results/large.json)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="work folder (default: a new temporary folder under /tmp, removed at the end)",
    )
    parser.add_argument(
        "--storescp-modes",
        default="default,bit-preserving",
        help="storescp runs: 'default' (dataset in memory) and/or 'bit-preserving' (+B)",
    )
    parser.add_argument(
        "--publish-timeout",
        type=float,
        default=10.0,
        help="dicomflow nats.publish_timeout (10, dicomflow's default; the tests use 3)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds to wait for dicomflow (1800)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.storescp_modes.split(",") if m.strip()]
    if set(modes) - {"default", "bit-preserving"}:
        parser.error("--storescp-modes: 'default' and/or 'bit-preserving'")

    created = args.work is None
    root = Path(tempfile.mkdtemp(prefix="dicomflow-large-", dir="/tmp")) if created else args.work
    root.mkdir(parents=True, exist_ok=True)
    keep = args.keep or not created
    print(subprocess.run(["df", "-h", str(root)], capture_output=True, text=True).stdout)
    payload = args.big_bytes + args.batch * args.batch_mib * MIB
    need = 9 * payload  # files, plaintext and sealed blobs, spools, object, get output
    free = shutil.disk_usage(root).free
    if free < need:
        print(f"not enough disk under {root}: {free / GIB:.1f} GiB free, need ~{need / GIB:.1f}")
        return 2
    results: list[dict[str, Any]] = []
    try:
        t = time.monotonic()
        files = root / "files"
        files.mkdir(exist_ok=True)
        big = make_big(files / "big.dcm", args.big_bytes)
        batch = [
            with_pixel_bytes(files / f"batch-{i:02d}.dcm", args.batch_mib * MIB, seed=i + 1)
            for i in range(args.batch)
        ]
        big_size = big.path.stat().st_size
        batch_size = sum(f.path.stat().st_size for f in batch)
        big_digest, big_dataset_bytes = dataset_sha256(big.path)
        print(
            f"generated big instance ({args.big_bytes} B of Pixel Data, file {big_size} B) "
            f"and {args.batch} x {args.batch_mib} MiB in {time.monotonic() - t:.0f} s; "
            f"work folder {root}\nbig dataset SHA-256 {big_digest} ({big_dataset_bytes} B)",
            flush=True,
        )
        for mode in modes:
            work = root / f"storescp-{mode}"
            print(f"storescp ({mode})...", flush=True)
            results.append(run_storescp(mode, big, batch, work))
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
        print("dicomflow...", flush=True)
        flow = run_dicomflow(big, batch, root / "dicomflow", args, big_digest)
        results.append(flow)

        summary = report(results, big_size, batch_size, args.batch)
        got = flow.get("get")
        print("\nCorrectness (big instance, dataset after the File Meta Information):")
        print(f"  sent                  {big_digest}")
        for r in results[:-1]:
            if r.get("big_dataset_sha256"):
                same = "identical" if r["big_dataset_sha256"] == big_digest else "DIFFERENT"
                print(f"  {r['target']:<21} {r['big_dataset_sha256']} {same}")
        if got and got.get("dataset_sha256"):
            same = "identical" if got["identical"] else "DIFFERENT"
            print(
                f"  dicomflow get         {got['dataset_sha256']} {same} "
                f"({got['seconds']} s, {got.get('mb_per_s')} MB/s)"
            )
            summary["verdicts"]["get identical"] = verdict(got["identical"])
        else:
            print(f"  dicomflow get FAILED: {got}")
            summary["verdicts"]["get identical"] = "FAIL"
        problems = {
            k: flow.get(k) for k in ("log_problems", "dead_letters", "nats_warnings") if flow.get(k)
        }
        if problems:
            print(f"\ndicomflow problems: {json.dumps(problems)[:3000]}")
        print("\nVerdicts: " + ", ".join(f"{k}: {v}" for k, v in summary["verdicts"].items()))

        for r in results:
            r["peaks_mib"] = {
                label: {
                    "big": mib(p.big),
                    "batch": mib(p.batch),
                    "overall": mib(p.overall),
                    "batch_exact": p.reset,
                }
                for label, p in r.pop("peaks", {}).items()
            }
        out = {
            "benchmark": "large",
            "when": datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "dcmtk": version_of([STORESCU, "--version"]),
                "dicomflow_commit": version_of(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
            },
            "parameters": {
                "big_pixel_bytes": args.big_bytes,
                "big_file_bytes": big_size,
                "batch": args.batch,
                "batch_pixel_mib": args.batch_mib,
                "batch_file_bytes": batch_size,
                "storescu": "-xe -R, TCP_NODELAY=1, one association: big then batch",
                "publish_timeout": args.publish_timeout,
            },
            "big_dataset_sha256": big_digest,
            "results": results,
            **summary,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"\nresults written to {args.out}")
        return 0 if all(v == "PASS" for v in summary["verdicts"].values()) else 1
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
