"""Where each stage's CPU goes: py-spy on the running stages, stacks grouped by cause.

``Recorder`` runs ``py-spy record --nonblocking --threads -f raw`` on each Python stage
for the measured window (the stage is never paused; py-spy reads its memory). py-spy
leaves out samples of threads the kernel reports as sleeping; a sample whose innermost
frame is a blocking wait (epoll, a condition, an idle executor thread) is a thread woken
but not yet running (the cores are shared) and is left out here too.

A stack is given one cause: the innermost frame that a rule below recognizes, by the
library its file is in or by the source line of dicomflow's own frame (what it calls:
C functions, hashlib or the AES-GCM cipher, have no Python frame of their own). Each
process's measured CPU (/proc, user + system) is then split over the causes in
proportion to their samples: ms of CPU per image per cause.

``python bench/pyspy.py DIR`` re-reads the files a run left in DIR and prints the
account again (for changing the rules without running the benchmark again).
"""

from __future__ import annotations

import json
import linecache
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):(?P<line>\d+)\)$")
SRC = Path(__file__).resolve().parents[1] / "src"
# Frames that hand work over (an event loop's callback, a thread's target): what sits
# below the innermost one is the task a sample is about.
DISPATCH = re.compile(
    r"^(BaseEventLoop\._run_once|Handle\._run|Thread\.run|_WorkItem\.run|_worker)$"
)


@dataclass(frozen=True)
class Frame:
    """One py-spy frame; ``file`` as py-spy prints it (relative to its sys.path entry)."""

    func: str
    file: str
    line: int

    @property
    def project(self) -> bool:
        return self.file.startswith("dicomflow/") or "/dicomflow/" in self.file

    @property
    def library(self) -> str:
        """The top package (or stdlib module) a library frame is in; '' for dicomflow's."""
        if self.project:
            return ""
        path = self.file.split("site-packages/", 1)[-1].lstrip("/")
        return path.split("/", 1)[0].removesuffix(".py")

    @property
    def module(self) -> str:
        return Path(self.file).stem

    def source(self) -> str:
        path = self.file if self.file.startswith("/") else str(SRC / self.file)
        return linecache.getline(path, self.line).strip()


def parse_frame(text: str) -> Frame | None:
    m = FRAME.match(text.strip())
    if m is None:
        return None
    return Frame(m["func"], m["file"], int(m["line"]))


def read_raw(path: Path) -> Counter[tuple[Frame, ...]]:
    """py-spy's raw (collapsed) output: 'frame;frame;...;frame count', root first."""
    stacks: Counter[tuple[Frame, ...]] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        body, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = tuple(f for f in map(parse_frame, body.split(";")) if f is not None)
        stacks[frames] += int(count)
    return stacks


# (cause, test on "module: function: source line" of a dicomflow frame), first match wins.
PROJECT_RULES: list[tuple[str, re.Pattern[str]]] = [
    # pdata: the scu-gateway's send side and the scp-gateway's receive side (both own the
    # data phase of their associations).
    ("pynetdicom DUL/reactor", re.compile(r"^(reactors|fence|pdata|contexts|tlslistener):")),
    (
        "logging/metrics/tracing",
        re.compile(
            r"^(logs|redact|metrics|telemetry|tracing|health):|\blog\.\w+\(|_metrics\."
            r"|\.labels\(|\.observe\(|\.inc\(|span"
        ),
    ),
    ("SHA-256", re.compile(r"sha256|digest|hashlib", re.I)),
    ("AES-GCM", re.compile(r"^(envelope|sealing|sealsign|keyring):.*(seal|crypt|update|final)")),
    ("pydicom parse", re.compile(r"^(identity|identityscan):|identify\(|dcmread|read_dataset")),
    ("spool write/read", re.compile(r"^spool:|spool|_open_body|_size_of|_received_of")),
    ("obstore write", re.compile(r"^(storage|backends|azurecontainer):|obstore|store\.put")),
    ("index writes", re.compile(r"^index:|index|\bkv\b|_kv\.", re.I)),
    ("event publish", re.compile(r"stored_subject|event", re.I)),
    (
        "cross-thread hop",
        re.compile(r"^hop:|threadsafe|to_thread|run_in_executor|future\.result|Future"),
    ),
    ("fetch", re.compile(r"fetch|next_msg|pull", re.I)),
    ("ack", re.compile(r"\back\b|\bnak\b|in_progress|_ack\b|ack\(|settle", re.I)),
    ("publish+PubAck wait", re.compile(r"publish|put_blob|blob|transport", re.I)),
    ("body copies (read/write in memory)", re.compile(r"\.write\(|\.read\(|BytesIO|getbuffer")),
]

LIBRARY_CAUSE = {
    "pynetdicom": "pynetdicom DUL/reactor",
    "socketserver": "pynetdicom DUL/reactor",
    "pydicom": "pydicom parse",
    "obstore": "obstore write",
    "cryptography": "AES-GCM",
    "logging": "logging/metrics/tracing",
    "prometheus_client": "logging/metrics/tracing",
    "opentelemetry": "logging/metrics/tracing",
    "json": "logging/metrics/tracing",
}
DUL = "pynetdicom DUL/reactor"
DUL_PARTS: list[tuple[str, re.Pattern[str]]] = [
    ("socket recv/send", re.compile(r"^AssociationSocket\.(recv|send|ready)$|^_read_pdu_data$")),
    ("hand-offs (queues, wakers)", re.compile(r"poke|_Waker|_Gate|notify|Queue\.(put|get)")),
    ("clock sleeps, wakeups", re.compile(r"Clock\.sleep$|Condition\.wait$")),
]
# A sample whose innermost frame is a blocking wait: on this machine py-spy reports such
# a thread as active when the kernel has it runnable, i.e. woken but not yet given a
# core (2 shared cores). That is waiting for a CPU, not using one: left out of the split.
WAIT = "(left out) runnable at a blocking wait: woken, waiting for a core"
WAITS = re.compile(
    r"^(\w*Selector\.select|_worker|Condition\.wait|Event\.wait|Thread\.join"
    r"|\w*Clock\.sleep|Queue\.get|_GatheringFuture\.\w+)$"
)
HOP = re.compile(r"threadsafe|_write_to_self|set_result|_chain_future|_call_set_state|^_worker$")
NATS_WRITE = "nats client socket write (flusher)"
NATS_READ = "nats client read loop (receive, parse)"


def _dul_part(stack: tuple[Frame, ...]) -> str:
    """pynetdicom's share, split by what its innermost recognized frame does."""
    for frame in reversed(stack):
        for part, rule in DUL_PARTS:
            if rule.search(frame.func):
                return f"{DUL}: {part}"
    return f"{DUL}: PDU/DIMSE decode, FSM, other"


def cause_of(stack: tuple[Frame, ...]) -> str:
    """One cause for one stack (root first): see the module docstring."""
    if stack and WAITS.match(stack[-1].func):
        return WAIT
    cut = max((i for i, f in enumerate(stack) if DISPATCH.match(f.func)), default=-1)
    task = stack[cut + 1 :]
    inner = next((i for i in range(len(task) - 1, -1, -1) if task[i].project), None)
    below = task[inner + 1 :] if inner is not None else task
    for frame in reversed(below):  # innermost library frame first
        if frame.library in LIBRARY_CAUSE:
            cause = LIBRARY_CAUSE[frame.library]
            return _dul_part(stack) if cause == DUL else cause
    if inner is not None:
        for frame in reversed(task[: inner + 1]):  # dicomflow's frames, innermost first
            if frame.project:
                text = f"{frame.module}: {frame.func}: {frame.source()}"
                for cause, rule in PROJECT_RULES:
                    if rule.search(text):
                        return _dul_part(stack) if cause == DUL else cause
    if any(f.library in ("pynetdicom", "socketserver") for f in stack):
        return _dul_part(stack)
    if any(HOP.search(f.func) for f in stack[cut:]):
        return "cross-thread hop"
    if any(f.library == "nats" for f in task):
        return NATS_WRITE if any(f.func.endswith("_flusher") for f in task) else NATS_READ
    if any(f.library in ("asyncio", "selectors") for f in stack):
        return "asyncio overhead (event loop, epoll)"
    leaf = stack[-1] if stack else None
    return f"other ({leaf.module}:{leaf.func})" if leaf else "other"


def account(stacks: Counter[tuple[Frame, ...]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for stack, count in stacks.items():
        out[cause_of(stack)] += count
    return out


def top_leaves(stacks: Counter[tuple[Frame, ...]], n: int = 12) -> list[tuple[str, int]]:
    """The innermost frames with the most samples (to check the rules against)."""
    leaves: Counter[str] = Counter()
    for stack, count in stacks.items():
        if stack:
            f = stack[-1]
            leaves[f"{f.module}.py:{f.line} {f.func}"] += count
    return leaves.most_common(n)


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc/<pid>/stat."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(rest[11]) / tick, int(rest[12]) / tick


class Recorder:
    """py-spy record on each PID until ``stop()``; raw output in ``out/<name>.txt``."""

    def __init__(self, pids: dict[str, int], out: Path, rate: int = 250) -> None:
        self.pids, self.out, self.rate = pids, out, rate
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @staticmethod
    def binary() -> str:
        beside = Path(sys.executable).parent / "py-spy"
        found = str(beside) if beside.exists() else shutil.which("py-spy")
        if found is None:
            raise RuntimeError("py-spy not found: .venv/bin/pip install py-spy")
        return found

    def start(self) -> Recorder:
        self.out.mkdir(parents=True, exist_ok=True)
        for name, pid in self.pids.items():
            log = (self.out / f"{name}.py-spy.log").open("wb")
            self.procs[name] = subprocess.Popen(
                [
                    *(self.binary(), "record", "--nonblocking", "--threads"),
                    *("-r", str(self.rate), "-f", "raw", "-o", str(self.out / f"{name}.txt")),
                    *("-p", str(pid)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def report(out: Path, cpu_s: dict[str, float], images: int) -> dict[str, dict[str, float]]:
    """Print (and write to ``out/account.json``) each process's CPU ms/image by cause."""
    table: dict[str, dict[str, float]] = {}
    print(f"\nProfile: CPU ms per image by cause (py-spy samples x measured CPU), {images} images")
    for name, seconds in cpu_s.items():
        per_image = seconds * 1000 / images
        path = out / f"{name}.txt"
        if not path.exists():
            table[name] = {"total (/proc)": round(per_image, 2)}
            print(f"  {name}: {per_image:.2f} ms/image (/proc; no Python profile)")
            continue
        stacks = read_raw(path)
        causes = account(stacks)
        waits = causes.pop(WAIT, 0)
        total = sum(causes.values()) or 1
        table[name] = {"total (/proc)": round(per_image, 2)}
        print(
            f"  {name}: {per_image:.2f} ms/image ({total} samples; {waits} more were at a "
            "blocking wait, runnable but not running, and are left out)"
        )
        for cause, n in causes.most_common():
            ms = per_image * n / total
            table[name][cause] = round(ms, 3)
            print(f"    {ms:6.2f}  {100 * n / total:5.1f}%  {cause}")
        (out / f"{name}.leaves.txt").write_text(
            "".join(f"{n:>7} {leaf}\n" for leaf, n in top_leaves(stacks, 40))
        )
    (out / "account.json").write_text(json.dumps({"images": images, "cpu_s": cpu_s, **table}))
    return table


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    saved = json.loads((folder / "account.json").read_text())
    report(folder, saved["cpu_s"], saved["images"])
