"""Helpers shared by the benchmarks (``ingest.py``, ``large.py``).

DCMTK ``storescu`` runs with a log4cplus config that timestamps each line to the
microsecond; its log gives the C-STORE timing. Peak memory is the kernel's VmHWM of a
process, read from /proc; a process run to completion here is run under GNU time, which
reports its peak RSS. ``StoredListener`` timestamps dicomflow's ``dicom.stored`` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

import nats  # noqa: E402
from dicomflow.shared.contracts import messages  # noqa: E402

from support.dicomfiles import Made  # noqa: E402
from support.pipeline import Pipeline  # noqa: E402

STORESCU = "/usr/bin/storescu"  # DCMTK's; the venv also has pynetdicom's storescu
STORESCP = "/usr/bin/storescp"
GNU_TIME = "/usr/bin/time"
DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")  # Debian's DCMTK leaves Nagle on otherwise
CALLING_AE = "STORESCU"
MIB = 1024 * 1024

# Compare like with like: what a Success answered by each target survives, as the
# benchmarks run it. dicomflow's nats-server runs as `dicomflow up` runs it.
NATS_SYNC_INTERVAL = "always"
DURABILITY = {
    "storescp": "a crash of storescp, NOT a power cut: it writes files without fsync",
    "orthanc": "a power cut: SyncStorageArea true (its default) fsyncs each file it stores",
    "dicomflow": "a power cut: nats-server with sync_interval always fsyncs before the "
    "acknowledgement the gateway answers Success on (as `dicomflow up` runs it)",
    "floor": "a power cut: the same nats-server settings as dicomflow's (sync_interval "
    "always); each body is acknowledged by JetStream twice, once per stream",
}

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
    # (request sent, response received or None), one per Store Request, in order.
    requests: list[tuple[float, float | None]] = field(default_factory=list)


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
            out.requests.append((when, None))
            if out.first_request is None:
                out.first_request = when
        elif message.startswith("Received Store Response"):
            out.statuses.append(message[message.find("(") + 1 : message.rfind(")")])
            if sent is not None:
                out.latencies.append(when - sent)
                out.requests[-1] = (sent, when)
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
    max_rss_kib: list[int | None] = field(default_factory=list)  # each storescu's peak

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


def timed(args: list[str], rss_file: Path) -> list[str]:
    """``args`` run under GNU time, which writes the peak RSS (KiB) to ``rss_file``.

    Not wait4's ru_maxrss of our own child: Linux carries the high-water mark of the
    address space a process had before exec into it, so a child of this (large) Python
    process would report at least our RSS. GNU time is a small process.
    """
    if not Path(GNU_TIME).is_file():
        return args
    return [GNU_TIME, "-o", str(rss_file), "-f", "%M", *args]


def peak_rss_kib(rss_file: Path) -> int | None:
    """What ``timed`` recorded: the last line of the file (GNU time may add a status)."""
    try:
        lines = rss_file.read_text().split()
    except OSError:
        return None
    return int(lines[-1]) if lines and lines[-1].isdigit() else None


def send(
    files: list[Made],
    associations: int,
    port: int,
    called: str,
    work: Path,
    *,
    timeout: float = 900,
    extra_args: tuple[str, ...] = (),
) -> SendResult:
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
                        timed(
                            [
                                *(STORESCU, "-lc", str(config), "-xe", "-R"),
                                *("-aet", CALLING_AE, *extra_args, "-aec", called),
                                *("127.0.0.1", str(port), *chunk),
                            ],
                            work / f"storescu-{i}.rss",
                        ),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=DCMTK_ENV,
                    )
                )
        deadline = time.monotonic() + timeout
        codes = [p.wait(timeout=max(deadline - time.monotonic(), 0.1)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    ended = time.time()
    return SendResult(
        started,
        ended,
        codes,
        [parse_scu_log(p) for p in log_paths],
        [peak_rss_kib(work / f"storescu-{i}.rss") for i in range(len(procs))],
    )


# -- processes and memory -------------------------------------------------------------
def proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def status_kib(status: dict[str, str], key: str) -> int:
    value = status.get(key, "0 kB").split()
    return int(value[0]) if value else 0


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def cpu_seconds(pid: int) -> float | None:
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
        self.cpu_start = {label: cpu_seconds(pid) for label, (pid, _) in roots.items()}
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
            status = proc_status(pid)
            if status:
                self.peak_kib[label] = max(self.peak_kib.get(label, 0), status_kib(status, "VmHWM"))
            rss = status_kib(status, "VmRSS")
            if tree:
                stack = child_pids(pid)
                while stack:
                    child = stack.pop()
                    stack += child_pids(child)
                    st = proc_status(child)
                    if "VmHWM" not in st:  # gone, or a zombie
                        continue
                    self.children_seen.setdefault(label, set()).add(child)
                    self.children_peak_kib[label] = max(
                        self.children_peak_kib.get(label, 0), status_kib(st, "VmHWM")
                    )
                    rss += status_kib(st, "VmRSS")
            self.tree_rss_peak_kib[label] = max(self.tree_rss_peak_kib.get(label, 0), rss)

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()
        for label, (pid, _) in self.roots.items():
            now, then = cpu_seconds(pid), self.cpu_start.get(label)
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


def wait_log(pipeline: Pipeline, stage: str, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in pipeline.logs(stage):
        if pipeline.stages[stage].exit_code() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{stage} did not get ready:\n{pipeline.logs(stage)[-2000:]}")
        time.sleep(0.05)


def log_problems(pipeline: Pipeline) -> dict[str, Any]:
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


def version_of(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "?"
