"""Ingest benchmark: DCMTK storescu into storescp, Orthanc and the dicomflow pipeline.

One run generates two synthetic CT series (N images each, 512x512x16 bit by default,
Explicit VR Little Endian; the second set has new UIDs), then sends, with DCMTK's
``storescu``, set A over one association and set B over four parallel associations
(four storescu processes) to each target:

* ``storescp``: DCMTK's storescp writing files to a folder (``--fork`` for 4 associations);
* ``orthanc``: Orthanc with its default SQLite index and filesystem storage;
* ``dicomflow``: scp-gateway -> NATS JetStream -> encryptor -> store-writer, local storage.

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
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import nats  # noqa: E402

from dicomflow.embedded.natsserver import NatsServer  # noqa: E402
from dicomflow.shared import messages  # noqa: E402
from support.dicomfiles import Made, ct_series  # noqa: E402
from support.pipeline import Pipeline  # noqa: E402
from support.servers import free_port  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's; the venv also has pynetdicom's storescu
STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # Debian's DCMTK leaves Nagle on otherwise
CALLING_AE = "STORESCU"
MIB = 1024 * 1024

LOG_CONFIG = """\
log4cplus.rootLogger = INFO, file
log4cplus.appender.file = log4cplus::FileAppender
log4cplus.appender.file.File = {path}
log4cplus.appender.file.layout = log4cplus::PatternLayout
log4cplus.appender.file.layout.ConversionPattern = %D{{%Y-%m-%d %H:%M:%S.%Q}} %m%n
"""


# -- storescu -------------------------------------------------------------------------
@dataclass
class ScuLog:
    first_request: float | None = None
    last_response: float | None = None
    latencies: list[float] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    max_send_pdv: int | None = None


def _timestamp(text: str) -> float:
    # "2025-11-23 05:18:12.214.698": milliseconds, then microseconds (%Q).
    head, micro = text.rsplit(".", 1)
    return datetime.strptime(head, "%Y-%m-%d %H:%M:%S.%f").timestamp() + int(micro) / 1e6


def parse_scu_log(path: Path) -> ScuLog:
    out = ScuLog()
    sent: float | None = None
    for line in path.read_text(errors="replace").splitlines():
        if len(line) < 28 or not line[:4].isdigit():
            continue
        when, message = _timestamp(line[:27]), line[28:]
        if message.startswith("Sending Store Request"):
            sent = when
            if out.first_request is None:
                out.first_request = when
        elif message.startswith("Received Store Response"):
            out.statuses.append(message[message.find("(") + 1 : message.rfind(")")])
            if sent is not None:
                out.latencies.append(when - sent)
                sent = None
            out.last_response = when
        elif message.startswith("Association Accepted (Max Send PDV:"):
            out.max_send_pdv = int(message.split(":")[1].strip(" )"))
    return out


@dataclass
class SendResult:
    started: float
    ended: float
    returncodes: list[int]
    logs: list[ScuLog]

    @property
    def first_request(self) -> float:
        return min(log.first_request for log in self.logs if log.first_request is not None)

    @property
    def last_response(self) -> float:
        return max(log.last_response for log in self.logs if log.last_response is not None)

    @property
    def latencies(self) -> list[float]:
        return [x for log in self.logs for x in log.latencies]

    @property
    def statuses(self) -> list[str]:
        return [s for log in self.logs for s in log.statuses]


def send(files: list[Made], associations: int, port: int, called: str, work: Path) -> SendResult:
    """storescu over ``associations`` concurrent associations, the files split evenly."""
    work.mkdir(parents=True, exist_ok=True)
    paths = [str(f.path) for f in files]
    size, extra = divmod(len(paths), associations)
    chunks, start = [], 0
    for i in range(associations):
        end = start + size + (1 if i < extra else 0)
        chunks.append(paths[start:end])
        start = end
    procs: list[subprocess.Popen[bytes]] = []
    log_paths = []
    started = time.time()
    try:
        for i, chunk in enumerate(chunks):
            log_path = work / f"storescu-{i}.log"
            config = work / f"storescu-{i}.logcfg"
            config.write_text(LOG_CONFIG.format(path=log_path))
            log_paths.append(log_path)
            with (work / f"storescu-{i}.out").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            *(STORESCU, "-lc", str(config), "-xe", "-R", "-aet", CALLING_AE),
                            *("-aec", called, "127.0.0.1", str(port), *chunk),
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=DCMTK_ENV,
                    )
                )
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    ended = time.time()
    return SendResult(started, ended, codes, [parse_scu_log(p) for p in log_paths])


# -- processes and memory -------------------------------------------------------------
def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _kib(status: dict[str, str], key: str) -> int:
    value = status.get(key, "0 kB").split()
    return int(value[0]) if value else 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process and of the children it has reaped."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return sum(int(x) for x in rest[11:15]) / os.sysconf("SC_CLK_TCK")


class MemorySampler:
    """Peak RSS (VmHWM) per process; for a tree root, of its descendants too."""

    def __init__(self, roots: dict[str, tuple[int, bool]], interval: float = 0.1) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_kib: dict[str, int] = {}
        self.children_peak_kib: dict[str, int] = {}
        self.children_seen: dict[str, set[int]] = {}
        self.tree_rss_peak_kib: dict[str, int] = {}
        self.cpu_start = {label: _cpu_seconds(pid) for label, (pid, _) in roots.items()}
        self.cpu_s: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        for label, (pid, tree) in self.roots.items():
            status = _status(pid)
            if status:
                self.peak_kib[label] = max(self.peak_kib.get(label, 0), _kib(status, "VmHWM"))
            rss = _kib(status, "VmRSS")
            if tree:
                stack = _children(pid)
                while stack:
                    child = stack.pop()
                    stack += _children(child)
                    st = _status(child)
                    if "VmHWM" not in st:  # gone, or a zombie
                        continue
                    self.children_seen.setdefault(label, set()).add(child)
                    self.children_peak_kib[label] = max(
                        self.children_peak_kib.get(label, 0), _kib(st, "VmHWM")
                    )
                    rss += _kib(st, "VmRSS")
            self.tree_rss_peak_kib[label] = max(self.tree_rss_peak_kib.get(label, 0), rss)

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()
        for label, (pid, _) in self.roots.items():
            now, then = _cpu_seconds(pid), self.cpu_start.get(label)
            if now is not None and then is not None and label not in self.cpu_s:
                self.cpu_s[label] = round(now - then, 2)
        out: dict[str, Any] = {
            label: round(kib / 1024, 1) for label, kib in sorted(self.peak_kib.items())
        }
        for label, kib in self.children_peak_kib.items():
            out[f"{label} (largest forked child)"] = round(kib / 1024, 1)
            out[f"{label} (children seen)"] = len(self.children_seen.get(label, ()))
            out[f"{label} (tree, sampled sum)"] = round(self.tree_rss_peak_kib[label] / 1024, 1)
        return out


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until something listens on 127.0.0.1:port, seen in /proc/net/tcp (no probe)."""
    suffix = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for line in Path(table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[1].endswith(suffix) and fields[3] == "0A":
                        return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on port {port} after {timeout}s")


def terminate(proc: subprocess.Popen[bytes] | None, group: bool = False) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if group:  # the server was started in a session of its own: pgid == pid
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait()


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


class StoredListener:
    """Timestamps each dicom.stored event (first one per SOP Instance UID) on arrival."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: dict[str, float] = {}
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def start(self) -> StoredListener:
        self._thread.start()
        if not self._ready.wait(15) or self._error is not None:
            raise RuntimeError(f"cannot subscribe to dicom.stored: {self._error!r}")
        return self

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            nc = await nats.connect(self.url)
        except Exception as exc:  # noqa: BLE001 (reported by start())
            self._error = exc
            self._ready.set()
            return

        async def on_stored(msg: Any) -> None:
            sop = (msg.headers or {}).get(messages.H_SOP_INSTANCE, "")
            self.times.setdefault(sop, time.time())

        await nc.subscribe("dicom.stored.>", cb=on_stored)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def wait(self, sops: set[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sops <= self.times.keys():
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


def _wait_log(pipeline: Pipeline, stage: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in pipeline.logs(stage):
        if pipeline.stages[stage].exit_code() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{stage} did not get ready:\n{pipeline.logs(stage)[-2000:]}")
        time.sleep(0.05)


def _log_problems(pipeline: Pipeline) -> dict[str, Any]:
    """WARNING and worse, and anything that is not a JSON log line (tracebacks)."""
    out: dict[str, Any] = {}
    for stage in pipeline.stages:
        found: dict[str, int] = {}
        samples: list[str] = []
        for line in pipeline.logs(stage).splitlines():
            try:
                level = str(json.loads(line).get("level", ""))
                message = str(json.loads(line).get("msg", ""))[:200]
            except ValueError:
                level, message = "non-json", line[:200]
            if level in ("INFO", "DEBUG"):
                continue
            found[level] = found.get(level, 0) + 1
            if len(samples) < 5:
                samples.append(f"{level}: {message}")
        if found:
            out[stage] = {"counts": found, "first": samples}
    return out


def run_dicomflow(
    files: list[Made], associations: int, work: Path, timeout: float
) -> dict[str, Any]:
    server = NatsServer(work / "nats")
    pipeline: Pipeline | None = None
    listener: StoredListener | None = None
    sampler: MemorySampler | None = None
    result: dict[str, Any] = {}
    try:
        server.start()
        pipeline = Pipeline(work, server, {"backend": "local", "local_path": work / "objects"})
        pipeline.start()
        _wait_log(pipeline, "encryptor", "encryptor ready")
        _wait_log(pipeline, "store-writer", "store-writer ready")
        listener = StoredListener(server.url).start()
        roots = {"nats-server": (server.pid, False)}
        for name, stage in pipeline.stages.items():
            assert stage.pid is not None
            roots[name] = (stage.pid, False)
        sampler = MemorySampler(roots).start()
        sent = send(files, associations, pipeline.port, pipeline.ae_title, work / "scu")
        expected = {f.sop_instance_uid for f in files}
        complete = listener.wait(expected, timeout)
        memory = sampler.finish()
        memory["dicomflow total (sum of peaks)"] = round(
            sum(v for k, v in memory.items() if k in roots), 1
        )
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
        result = {
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
        if listener is not None:
            listener.stop()
        if pipeline is not None:
            pipeline.stop()
        server.stop()
    # Read after the stop, so that what the stages log while draining is included.
    result["log_problems"] = _log_problems(pipeline)
    return result


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


def ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    def rate(target: str, assoc: int) -> float | None:
        for r in results:
            if r["target"] == target and r["associations"] == assoc:
                if target == "dicomflow":
                    return r["end_to_end"]["images_per_s"]  # type: ignore[no-any-return]
                return r["cstore_images_per_s"]  # type: ignore[no-any-return]
        return None

    out: dict[str, Any] = {}
    for assoc in (1, 4):
        ours = rate("dicomflow", assoc)
        for other in ("orthanc", "storescp"):
            theirs = rate(other, assoc)
            if ours and theirs:
                out[f"dicomflow_e2e/{other} ({assoc} assoc)"] = round(ours / theirs, 3)
    return out


def _version(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Ingest benchmark: DCMTK storescu (1 and 4 associations) into DCMTK storescp, "
            "Orthanc and the dicomflow pipeline (local storage). Prints a table and "
            "writes JSON results."
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
        default="storescp,orthanc,dicomflow",
        help="comma-separated subset of storescp,orthanc,dicomflow (all)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for dicomflow to store all"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (files, logs, outputs)"
    )
    args = parser.parse_args(argv)
    if args.count < 4:
        parser.error("--count must be at least 4 (four associations)")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(targets) - {"storescp", "orthanc", "dicomflow"}
    if unknown:
        parser.error(f"unknown target(s): {', '.join(sorted(unknown))}")

    root = Path(tempfile.mkdtemp(prefix="dicomflow-bench-"))
    results: list[dict[str, Any]] = []
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
                    raw = run_dicomflow(files, assoc, work, args.timeout)
                result = summarize(target, assoc, files, raw)
                results.append(result)
                if not result["ok"]:
                    print(f"  WARNING: not every image confirmed: {result}", flush=True)
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
        summary = {
            "benchmark": "ingest",
            "when": datetime.now().astimezone().isoformat(timespec="seconds"),
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "dcmtk": _version([STORESCU, "--version"]),
                "orthanc": _version([ORTHANC, "--version"]),
                "dicomflow_commit": _version(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
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
            },
            "results": results,
            "ratios_images_per_s": ratios(results),
        }
        print()
        print_table(results)
        print("\nRatios (dicomflow all-stored images/s over theirs):")
        for key, value in summary["ratios_images_per_s"].items():
            print(f"  {key}: {value}")
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
