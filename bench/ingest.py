"""Ingest benchmark: DCMTK storescu into storescp, Orthanc and the dicomflow pipeline.

One run generates two synthetic CT series (N images each, 512x512x16 bit by default,
Explicit VR Little Endian; the second set has new UIDs), then sends, with DCMTK's
``storescu``, set A over one association and set B over four parallel associations
(four storescu processes) to each target:

* ``storescp``: DCMTK's storescp writing files to a folder (``--fork`` for 4 associations);
  it does not fsync them, so its Success does not survive a power cut;
* ``orthanc``: Orthanc with its default SQLite index and filesystem storage, fsyncing
  each stored file (``SyncStorageArea``, its default, stated in the config);
* ``dicomflow``: scp-gateway -> NATS JetStream -> encryptor -> store-writer, local storage;
  nats-server with ``sync_interval: always`` (fsync before acknowledging), as ``up`` runs it.

Every target gets a fresh server (fresh folders) per run, all on 127.0.0.1. Times come
from storescu's own log, timestamped to the microsecond through a DCMTK log config: the
C-STORE span runs from the first "Sending Store Request" to the last "Received Store
Response"; a C-STORE latency is the time between those two lines for one image. For
dicomflow, "all stored" is when the last ``dicom.stored`` event (published by the
store-writer after the object is written and its index record marked stored) reached a
NATS subscriber in this process; the index is then checked to hold N stored records.

Peak memory is VmHWM (the kernel's peak RSS) of each server process, read from /proc;
storescp's forked children are sampled every 100 ms while they live.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    DCMTK_ENV,
    DURABILITY,
    MIB,
    NATS_SYNC_INTERVAL,
    REPO,
    STORESCP,
    STORESCU,
    MemorySampler,
    SendResult,
    StoredListener,
    log_problems,
    send,
    terminate,
    version_of,
    wait_listening,
    wait_log,
)
from floor import FloorResult, run_floor
from pyspy import Recorder, cpu_split
from pyspy import report as profile_report

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import Made, ct_series
from support.pipeline import Pipeline
from support.servers import free_port

ORTHANC = "/usr/sbin/Orthanc"
TARGETS = ("storescp", "orthanc", "floor", "dicomflow")
# Issue 17's targets, against the floor of the design measured in the same run.
RATE_TARGET = 0.8  # dicomflow all-stored images/s over the floor's, 1 and 4 associations
CPU_TARGET = 2.0  # dicomflow CPU/image (all processes) over the floor's nats-server CPU/image
REPLICATED = ("scp-gateway", "encryptor", "store-writer")  # what --replicas multiplies


# -- targets --------------------------------------------------------------------------
def run_storescp(files: list[Made], associations: int, work: Path) -> dict[str, Any]:
    out_dir = work / "received"
    out_dir.mkdir(parents=True)
    port = free_port()
    args = [STORESCP, *(["--fork"] if associations > 1 else []), "-od", str(out_dir), str(port)]
    proc = sampler = None
    with (work / "storescp.log").open("wb") as log:
        try:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV, start_new_session=True
            )
            wait_listening(port, proc)
            sampler = MemorySampler({"storescp": (proc.pid, True)}).start()
            sent = send(files, associations, port, "ANY-SCP", work / "scu")
            memory = sampler.finish()
            received = sum(1 for p in out_dir.iterdir() if p.is_file())
        finally:
            if sampler is not None:
                sampler.finish()
            terminate(proc, group=True)
    return {
        "sent": sent,
        "memory_mib": memory,
        "cpu_s_during_run": sampler.cpu_s,
        "confirmed": received,
        "confirmed_how": "files in storescp's output folder",
        "server_args": " ".join(args[:-2]) + " DIR PORT",
    }


def _http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (loopback http)
        return json.loads(response.read())


def run_orthanc(files: list[Made], associations: int, work: Path) -> dict[str, Any]:
    dicom_port, http_port = free_port(), free_port()
    while http_port == dicom_port:
        http_port = free_port()
    config = {
        "Name": "dicomflow-bench",
        "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"),
        "DicomAet": "ORTHANC",
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "Plugins": [],
        "SyncStorageArea": True,  # Orthanc's default, stated: fsync each stored file
    }
    config_path = work / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    base = f"http://127.0.0.1:{http_port}"
    proc = sampler = None
    with (work / "orthanc.log").open("wb") as log:
        try:
            proc = subprocess.Popen(
                [ORTHANC, str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=DCMTK_ENV,  # Orthanc's DICOM server is DCMTK's dcmnet: Nagle off too
                start_new_session=True,
            )
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"Orthanc exited with code {proc.returncode}")
                try:
                    system = _http_json(f"{base}/system")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            wait_listening(dicom_port, proc)
            sampler = MemorySampler({"Orthanc": (proc.pid, False)}).start()
            sent = send(files, associations, dicom_port, "ORTHANC", work / "scu")
            memory = sampler.finish()
            stats = _http_json(f"{base}/statistics")
        finally:
            if sampler is not None:
                sampler.finish()
            terminate(proc)
    return {
        "sent": sent,
        "memory_mib": memory,
        "cpu_s_during_run": sampler.cpu_s,
        "confirmed": int(stats["CountInstances"]),
        "confirmed_how": "Orthanc REST /statistics CountInstances",
        "orthanc_version": system.get("Version"),
    }


def run_dicomflow(
    files: list[Made],
    associations: int,
    work: Path,
    timeout: float,
    profile: Path | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    """``profile``: py-spy each Python stage into that folder over the measured window.
    ``replicas``: processes of each stage (the gateways share the port, as `up --replicas`)."""
    server = NatsServer(work / "nats", sync_interval=NATS_SYNC_INTERVAL)
    pipeline: Pipeline | None = None
    listener: StoredListener | None = None
    sampler: MemorySampler | None = None
    recorder: Recorder | None = None
    result: dict[str, Any] = {}
    try:
        server.start()
        pipeline = Pipeline(
            work,
            server,
            {"backend": "local", "local_path": work / "objects"},
            extra={"scp": {"reuse_port": True}} if replicas > 1 else {},
            more={stage: replicas - 1 for stage in REPLICATED} if replicas > 1 else {},
        )
        pipeline.start()
        wait_log(pipeline, "encryptor", "encryptor ready")
        wait_log(pipeline, "store-writer", "store-writer ready")
        listener = StoredListener(server.url).start()
        roots = {"nats-server": (server.pid, False)}
        for name, stage in pipeline.stages.items():
            assert stage.pid is not None
            roots[name] = (stage.pid, False)
        sampler = MemorySampler(roots).start()
        splits = {name: cpu_split(pid) for name, (pid, _) in roots.items()}
        if profile is not None:
            stages = {name: pid for name, (pid, _) in roots.items() if name != "nats-server"}
            recorder = Recorder(stages, profile).start()
        sent = send(files, associations, pipeline.port, pipeline.ae_title, work / "scu")
        expected = {f.sop_instance_uid for f in files}
        complete = listener.wait(expected, timeout)
        memory = sampler.finish()
        result["cpu_user_system_s"] = {
            name: tuple(
                round(b - a, 2) for a, b in zip(before, cpu_split(roots[name][0]), strict=True)
            )
            for name, before in splits.items()
        }
        if recorder is not None:
            recorder.stop()
        memory["dicomflow total (sum of peaks)"] = round(
            sum(v for k, v in memory.items() if k in roots), 1
        )
        result["gateway_response_ms_mean"] = _gateway_response_ms(pipeline)
        events = {sop: t for sop, t in listener.times.items() if sop in expected}
        stored = pipeline.wait_stored(len(files), timeout=30 if complete else 1)
        stored_at = [
            datetime.fromisoformat(r["stored_at"]).timestamp()
            for sop, r in stored.items()
            if sop in expected and r.get("stored_at")
        ]
        nats_warnings = [
            line
            for line in list(getattr(server, "_lines", []))
            if "[WRN]" in line or "[ERR]" in line
        ]
        result |= {
            "sent": sent,
            "memory_mib": memory,
            "cpu_s_during_run": sampler.cpu_s,
            "confirmed": sum(1 for sop in stored if sop in expected),
            "confirmed_how": "index records in state stored (dicomflow ls --json)",
            "all_events": complete,
            "last_stored_event": max(events.values()) if events else None,
            "stored_event_times": sorted(events.values()),
            "last_stored_at_index": max(stored_at) if stored_at else None,
            "dead_letters": len(pipeline.dead_letters()),
            "nats_warnings": nats_warnings[:10],
        }
    finally:
        if sampler is not None:
            sampler.finish()
        if recorder is not None:
            recorder.stop()
        if listener is not None:
            listener.stop()
        if pipeline is not None:
            pipeline.stop()
        server.stop()
    # Read after the stop, so that what the stages log while draining is included.
    result["log_problems"] = log_problems(pipeline)
    return result


def _gateway_response_ms(pipeline: Pipeline) -> float | None:
    """The gateway's mean time from a received dataset to its Success response (publish
    and JetStream's fsynced PubAck included), from its ``cstore_seconds`` histogram."""
    try:
        port = pipeline.metrics_port("scp-gateway")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except (OSError, RuntimeError):
        return None
    values = {}
    for line in text.splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"dicomflow_cstore_seconds_{part}{{") and 'status="success"' in line:
                values[part] = float(line.rsplit(" ", 1)[1])
    if not values.get("count"):
        return None
    return round(1000 * values["sum"] / values["count"], 2)


# -- reporting ------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000, 2)


def summarize(
    target: str, associations: int, files: list[Made], raw: dict[str, Any]
) -> dict[str, Any]:
    sent: SendResult = raw.pop("sent")
    count = len(files)
    total_bytes = sum(f.path.stat().st_size for f in files)
    span = sent.last_response - sent.first_request
    latencies = sent.latencies
    ok_statuses = sum(1 for s in sent.statuses if s == "Success")
    result: dict[str, Any] = {
        "target": target,
        "associations": associations,
        "images": count,
        "file_bytes": total_bytes,
        "storescu_returncodes": sent.returncodes,
        "responses_success": ok_statuses,
        "responses_other": [s for s in sent.statuses if s != "Success"][:10],
        "max_send_pdv": sorted({log.max_send_pdv for log in sent.logs if log.max_send_pdv}),
        "storescu_wall_s": round(sent.ended - sent.started, 3),
        "cstore_span_s": round(span, 3),
        "cstore_images_per_s": round(count / span, 1),
        "cstore_mb_per_s": round(total_bytes / 1e6 / span, 1),
        "latency_ms": {
            "p50": _ms(_percentile(latencies, 0.50)),
            "p99": _ms(_percentile(latencies, 0.99)),
            "mean": _ms(statistics.fmean(latencies)) if latencies else None,
            "max": _ms(max(latencies)) if latencies else None,
            "samples": len(latencies),
            "how": "storescu log: 'Sending Store Request' to 'Received Store Response'",
        },
    }
    last = raw.pop("last_stored_event", None)
    times = raw.pop("stored_event_times", None)
    if target == "dicomflow":
        e2e = (last - sent.first_request) if last is not None else None
        result["end_to_end"] = {
            "all_stored_s": round(e2e, 3) if e2e else None,
            "images_per_s": round(count / e2e, 1) if e2e else None,
            "mb_per_s": round(total_bytes / 1e6 / e2e, 1) if e2e else None,
            "drain_after_storescu_done_s": round(last - sent.last_response, 3) if last else None,
            "stored_when_storescu_done": sum(1 for t in times or [] if t <= sent.last_response),
            "index_last_stored_at_minus_first_request_s": (
                round(raw["last_stored_at_index"] - sent.first_request, 3)
                if raw.get("last_stored_at_index")
                else None
            ),
            "how": "first Store Request to the last dicom.stored event seen by a subscriber",
        }
        raw.pop("last_stored_at_index", None)
    result.update(raw)
    result["success_survives"] = DURABILITY[target]
    result["ok"] = (
        ok_statuses == count
        and result["confirmed"] == count
        and all(code == 0 for code in sent.returncodes)
    )
    return result


def _fmt(x: Any, width: int) -> str:
    return ("-" if x is None else str(x)).rjust(width)


def print_table(results: list[dict[str, Any]]) -> None:
    head = (
        f"{'target':<24}{'assoc':>6}{'images':>7}{'span s':>9}{'img/s':>9}{'MB/s':>8}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'ok':>5}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        label = r["target"] + (" (gateway ack)" if r["target"] == "dicomflow" else "")
        print(
            f"{label:<24}{r['associations']:>6}{r['images']:>7}{r['cstore_span_s']:>9}"
            f"{r['cstore_images_per_s']:>9}{r['cstore_mb_per_s']:>8}"
            f"{_fmt(r['latency_ms']['p50'], 9)}{_fmt(r['latency_ms']['p99'], 9)}"
            f"{'yes' if r['ok'] else 'NO':>5}"
        )
        if "end_to_end" in r:
            e = r["end_to_end"]
            print(
                f"{'dicomflow (all stored)':<24}{r['associations']:>6}{r['images']:>7}"
                f"{_fmt(e['all_stored_s'], 9)}{_fmt(e['images_per_s'], 9)}"
                f"{_fmt(e['mb_per_s'], 8)}{'':>18}{'yes' if r['ok'] else 'NO':>5}"
                f"   (stored at ack: {e['stored_when_storescu_done']}/{r['images']},"
                f" drain {e['drain_after_storescu_done_s']} s)"
            )
    print("\nWhat a Success survives (compare like with like):")
    for target in dict.fromkeys(r["target"] for r in results):
        print(f"  {target:<10} {DURABILITY[target]}")
    print("\nPeak RSS (VmHWM, MiB):")
    for r in results:
        parts = ", ".join(f"{k} {v}" for k, v in r["memory_mib"].items())
        print(f"  {r['target']:<10} {r['associations']} assoc: {parts}")
    print("\nCPU seconds used during the run (user+system, reaped children included):")
    for r in results:
        parts = ", ".join(f"{k} {v}" for k, v in r["cpu_s_during_run"].items())
        print(f"  {r['target']:<10} {r['associations']} assoc: {parts}")
    problems = [r for r in results if r.get("log_problems") or r.get("dead_letters")]
    for r in problems:
        print(
            f"\ndicomflow {r['associations']} assoc: dead letters {r['dead_letters']}, "
            f"log problems {json.dumps(r['log_problems'])}"
        )


def _find(results: list[dict[str, Any]], target: str, assoc: int) -> dict[str, Any] | None:
    return next((r for r in results if r["target"] == target and r["associations"] == assoc), None)


def ratios(results: list[dict[str, Any]], floor: FloorResult | None) -> dict[str, Any]:
    def rate(target: str, assoc: int) -> float | None:
        r = _find(results, target, assoc)
        if r is None:
            return None
        if target == "dicomflow":
            return r["end_to_end"]["images_per_s"]  # type: ignore[no-any-return]
        return r["cstore_images_per_s"]  # type: ignore[no-any-return]

    out: dict[str, Any] = {}
    for assoc in (1, 4):
        ours = rate("dicomflow", assoc)
        theirs_by = {"orthanc": rate("orthanc", assoc), "storescp": rate("storescp", assoc)}
        theirs_by["floor"] = floor.images_per_s if floor else None
        for other, theirs in theirs_by.items():
            if ours and theirs:
                out[f"dicomflow_e2e/{other} ({assoc} assoc)"] = round(ours / theirs, 3)
    return out


def cpu_ms_per_image(r: dict[str, Any]) -> dict[str, float]:
    """Each process's CPU over the run, per image; 'all' is their sum."""
    per = {k: round(v * 1000 / r["images"], 2) for k, v in r["cpu_s_during_run"].items()}
    per["all"] = round(sum(per.values()), 2)
    return per


def issue17_figures(results: list[dict[str, Any]], floor: FloorResult | None) -> dict[str, Any]:
    """Issue 17's figures: dicomflow against the floor of the design, same run."""
    out: dict[str, Any] = {}
    for assoc in (1, 4):
        r = _find(results, "dicomflow", assoc)
        if r is None or floor is None:
            continue
        rate = r["end_to_end"]["images_per_s"]
        cpu = cpu_ms_per_image(r)["all"]
        out[f"{assoc} assoc"] = {
            "rate_over_floor": round(rate / floor.images_per_s, 3) if rate else None,
            "rate_target": RATE_TARGET,
            "cpu_ms_per_image": cpu,
            "cpu_over_floor_nats": round(cpu / floor.nats_cpu_ms_per_image, 2),
            "cpu_target": CPU_TARGET,
        }
    return out


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "FAIL")


def scale_out_figures(
    single: dict[str, Any] | None, scaled: dict[str, Any], replicas: int
) -> dict[str, Any]:
    """Four associations, one process per stage against ``replicas``, same run."""

    def figures(r: dict[str, Any] | None) -> dict[str, Any]:
        if r is None:
            return {"all_stored_images_per_s": None, "gateway_images_per_s": None}
        return {
            "all_stored_images_per_s": r.get("end_to_end", {}).get("images_per_s"),
            "gateway_images_per_s": r["cstore_images_per_s"],
            "cpu_ms_per_image": cpu_ms_per_image(r).get("all"),
            "ok": r["ok"],
        }

    one, many = figures(single), figures(scaled)
    a, b = one["all_stored_images_per_s"], many["all_stored_images_per_s"]
    return {
        "associations": 4,
        "replicas": replicas,
        "one_process_per_stage": one,
        "replicated": many,
        "all_stored_ratio": round(b / a, 2) if a and b else None,
    }


def print_scale_out(figures: dict[str, Any]) -> None:
    one, many, n = figures["one_process_per_stage"], figures["replicated"], figures["replicas"]
    print(f"\nScale-out (4 associations, all stored; 1 against {n} processes per stage):")
    print(
        f"  1 process/stage: {one['all_stored_images_per_s']} img/s "
        f"(gateway {one['gateway_images_per_s']}); {n} processes/stage: "
        f"{many['all_stored_images_per_s']} img/s (gateway {many['gateway_images_per_s']}); "
        f"ratio {figures['all_stored_ratio']}"
    )


def print_floor_and_targets(
    results: list[dict[str, Any]], floor: FloorResult | None, figures: dict[str, Any]
) -> None:
    if floor is not None:
        print(
            "\nFloor of the design (two JetStream work-queue streams, sync_interval always; "
            "one nats-py client, batches of 16):"
        )
        print(
            f"  {floor.images} images in {floor.seconds:.3f} s: {floor.images_per_s} img/s, "
            f"nats-server {floor.nats_cpu_ms_per_image} ms CPU/image "
            f"(the client: {floor.client_cpu_ms_per_image} ms/image, not counted)"
        )
    if figures:
        print("\nIssue 17 targets (dicomflow all stored, against the floor, same run):")
        for key, f in figures.items():
            rate = f["rate_over_floor"]
            print(
                f"  {key}: rate {_fmt(rate, 0)} of the floor (target >= {RATE_TARGET}) "
                f"{_verdict(None if rate is None else rate >= RATE_TARGET)}; "
                f"CPU {f['cpu_ms_per_image']} ms/image, all processes = "
                f"{f['cpu_over_floor_nats']} x the floor's nats-server (target <= {CPU_TARGET}x) "
                f"{_verdict(f['cpu_over_floor_nats'] <= CPU_TARGET)}"
            )
    rows = [
        (assoc, _find(results, "dicomflow", assoc), _find(results, "orthanc", assoc))
        for assoc in (1, 4)
    ]
    rows = [(a, d, o) for a, d, o in rows if d is not None and o is not None]
    if rows:
        print(
            "\nGateway acknowledged rate and C-STORE p99, beside Orthanc's "
            "(same files, same storescu; per-request times from storescu's log timestamps):"
        )
        for assoc, d, o in rows:
            assert d is not None and o is not None
            ratio = round(d["cstore_images_per_s"] / o["cstore_images_per_s"], 3)
            print(
                f"  {assoc} assoc: dicomflow gateway {d['cstore_images_per_s']} img/s, "
                f"p99 {d['latency_ms']['p99']} ms; Orthanc {o['cstore_images_per_s']} img/s, "
                f"p99 {o['latency_ms']['p99']} ms; rate ratio {ratio}"
            )
    for r in results:
        if r["target"] == "dicomflow" and r.get("gateway_response_ms_mean") is not None:
            print(
                f"  dicomflow {r['associations']} assoc: of each C-STORE's "
                f"{r['latency_ms']['p50']} ms (p50 at storescu), the gateway spent "
                f"{r['gateway_response_ms_mean']} ms (mean) from the whole dataset received "
                "to the response: its publish and JetStream's fsynced PubAck"
            )
    print("\nCPU ms per image, each process (user+system over the run):")
    for r in results:
        parts = ", ".join(f"{k} {v}" for k, v in cpu_ms_per_image(r).items())
        print(f"  {r['target']:<10} {r['associations']} assoc: {parts}")
    print("  of which in the kernel (system time: socket and file I/O, fsync, page faults):")
    for r in results:
        split = r.get("cpu_user_system_s")
        if split and r.get("images"):
            parts = ", ".join(
                f"{k} {round(1000 * system / r['images'], 2)}" for k, (_, system) in split.items()
            )
            print(f"  {r['target']:<10} {r['associations']} assoc: {parts}")
    if floor is not None:
        print(f"  {'floor':<10}         nats-server {floor.nats_cpu_ms_per_image}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Ingest benchmark: DCMTK storescu (1 and 4 associations) into DCMTK storescp, "
            "Orthanc and the dicomflow pipeline (local storage), and the floor of the "
            "design (the same bodies through two durable JetStream streams). Prints a "
            "table and issue 17's figures and writes JSON results."
        )
    )
    parser.add_argument("--count", type=int, default=300, help="images per series (300)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns (512)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "ingest.json",
        help="JSON results file (bench/results/ingest.json)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)} (all)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for dicomflow to store all"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (files, logs, outputs)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="py-spy the dicomflow stages on the one-association run (pip install py-spy); "
        "raw stacks and the account of CPU ms/image by cause go to DIR (re-read with "
        "`python bench/pyspy.py DIR`). py-spy takes CPU too: the rates of that run are lower",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=2,
        metavar="N",
        help="also run dicomflow on four associations with N processes of each stage "
        "(scp-gateway sharing the port, encryptor, store-writer) and print the rate "
        "against one process per stage (default 2; 1 skips it)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.replicas <= 16:
        parser.error("--replicas must be 1 to 16")
    if args.count < 4:
        parser.error("--count must be at least 4 (four associations)")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")

    root = Path(tempfile.mkdtemp(prefix="dicomflow-bench-"))
    results: list[dict[str, Any]] = []
    floor: FloorResult | None = None
    try:
        t = time.monotonic()
        sets = {
            1: ct_series(root / "files-a", args.count, rows=args.size, columns=args.size),
            4: ct_series(root / "files-b", args.count, rows=args.size, columns=args.size),
        }
        size = sum(f.path.stat().st_size for f in sets[1])
        print(
            f"generated 2 x {args.count} CT images {args.size}x{args.size}x16 "
            f"({size / args.count / MIB:.2f} MiB each) in {time.monotonic() - t:.1f} s; "
            f"work folder {root}",
            flush=True,
        )
        for target in targets:
            if target == "floor":
                print("floor (two durable JetStream streams)...", flush=True)
                floor = run_floor([f.path for f in sets[1]], root / "floor")
                if not args.keep:
                    shutil.rmtree(root / "floor", ignore_errors=True)
                continue
            for assoc in (1, 4):
                work = root / f"{target}-{assoc}"
                work.mkdir()
                files = sets[assoc]
                print(f"{target}, {assoc} association(s)...", flush=True)
                if target == "storescp":
                    raw = run_storescp(files, assoc, work)
                elif target == "orthanc":
                    raw = run_orthanc(files, assoc, work)
                else:
                    profile = args.profile if assoc == 1 else None
                    raw = run_dicomflow(files, assoc, work, args.timeout, profile)
                result = summarize(target, assoc, files, raw)
                results.append(result)
                if not result["ok"]:
                    print(f"  WARNING: not every image confirmed: {result}", flush=True)
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
        scale_out: dict[str, Any] | None = None
        if "dicomflow" in targets and args.replicas > 1:
            work = root / f"dicomflow-4-x{args.replicas}"
            work.mkdir()
            print(f"dicomflow, 4 associations, {args.replicas} processes per stage...", flush=True)
            raw = run_dicomflow(sets[4], 4, work, args.timeout, None, args.replicas)
            scaled = summarize("dicomflow", 4, sets[4], raw)
            if not scaled["ok"]:
                print(f"  WARNING: not every image confirmed: {scaled}", flush=True)
            scale_out = scale_out_figures(_find(results, "dicomflow", 4), scaled, args.replicas)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
        summary: dict[str, Any] = {
            "benchmark": "ingest",
            "when": datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "dcmtk": version_of([STORESCU, "--version"]),
                "orthanc": version_of([ORTHANC, "--version"]),
                "dicomflow_commit": version_of(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
            },
            "parameters": {
                "count": args.count,
                "rows": args.size,
                "columns": args.size,
                "transfer_syntax": "1.2.840.10008.1.2.1 (Explicit VR Little Endian)",
                "storescu": "-xe -R, TCP_NODELAY=1, 1 process or 4 concurrent processes",
                "sets": "set A for 1 association, set B (new UIDs) for 4; same sets for all",
                "servers": "fresh server and folders per run, 127.0.0.1",
                "tcp_nodelay": "TCP_NODELAY=1 in the environment of storescu, storescp, Orthanc",
                "success_survives": {t: DURABILITY[t] for t in targets},
            },
            "results": results,
            "floor": (
                None
                if floor is None
                else {
                    "images": floor.images,
                    "seconds": round(floor.seconds, 3),
                    "images_per_s": floor.images_per_s,
                    "nats_cpu_ms_per_image": floor.nats_cpu_ms_per_image,
                    "client_cpu_ms_per_image": floor.client_cpu_ms_per_image,
                    "memory_mib": floor.memory_mib,
                }
            ),
            "ratios_images_per_s": ratios(results, floor),
            "issue17": issue17_figures(results, floor),
            "scale_out": scale_out,
        }
        print()
        print_table(results)
        print("\nRatios (dicomflow all-stored images/s over theirs):")
        for key, value in summary["ratios_images_per_s"].items():
            print(f"  {key}: {value}")
        print_floor_and_targets(results, floor, summary["issue17"])
        if args.profile is not None:
            print("  (the one-association dicomflow run was profiled: py-spy slowed it)")
        if scale_out is not None:
            print_scale_out(scale_out)
        profiled = _find(results, "dicomflow", 1)
        if args.profile is not None and profiled is not None:
            summary["profile"] = profile_report(
                args.profile, profiled["cpu_s_during_run"], profiled["images"]
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
        return 0 if all(r["ok"] for r in results) else 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
