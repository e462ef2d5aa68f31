"""`dicomflow up` as a user runs it, for tests: start, send with DCMTK, read back, stop;
and the processes it started (from /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from support.pipeline import STORESCU


def start(data: Path, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """`up` on ``data``, DICOM on 127.0.0.1:``port``, calling AE CT01, free metrics ports
    (``extra`` comes last: a second ``--metrics-port`` wins)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dicomflow",
                "up",
                "--data-dir",
                str(data),
                "--port",
                str(port),
                "--host",
                "127.0.0.1",
                "--allow-ae",
                "CT01",
                "--metrics-port",
                "0",
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomflow", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def send(port: int, path: Path, calling: str = "CT01") -> str:
    done = subprocess.run(
        [STORESCU, "-v", "-aet", calling, "-aec", "DICOMFLOW", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    return done.stdout + done.stderr


def wait_listed(data: Path, uid: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = cli("ls", "--data-dir", str(data)).stdout
        if uid in listed and "stored" in listed:
            return listed
        time.sleep(0.5)
    raise AssertionError(f"{uid} not stored")


def stop(proc: subprocess.Popen[bytes], *, twice: bool = False) -> int:
    proc.send_signal(signal.SIGTERM)
    if twice:  # Ctrl-C pressed again and again, a supervisor's TERM: must never hang
        for _ in range(500):
            proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=90)


def processes() -> dict[int, tuple[int, str]]:
    """``{pid: (parent pid, command line)}`` of every live process (zombies left out)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        state, ppid = stat.rpartition(")")[2].split()[:2]
        if state != "Z":
            found[int(entry.name)] = (int(ppid), cmdline.replace(b"\0", b" ").decode().strip())
    return found


def children(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of the live child processes of ``pid``."""
    return {child: cmd for child, (ppid, cmd) in processes().items() if ppid == pid}


def using(folder: Path) -> dict[int, str]:
    """``{pid: command line}`` of the live processes naming ``folder`` in their arguments."""
    return {pid: cmd for pid, (_, cmd) in processes().items() if str(folder) in cmd}


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped, is not alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"
