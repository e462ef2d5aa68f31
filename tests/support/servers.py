"""Real servers for tests, started on free loopback ports chosen by the servers themselves."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dicomflow.embedded.process import terminate

T = TypeVar("T")
_RUNNING = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")


class MotoServer:
    """moto in server mode: a real HTTP S3 endpoint on loopback."""

    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._lines: deque[str] = deque(maxlen=50)
        self._ready = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoServer:
        binary = Path(sys.executable).parent / "moto_server"
        self._proc = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError("moto_server did not start:\n" + "\n".join(self._lines))
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line.rstrip())
            match = _RUNNING.search(line)
            if match:
                self.port = int(match.group(1))
                self._ready.set()

    def create_bucket(self, name: str) -> None:
        client = self.client()
        client.create_bucket(Bucket=name)

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # noqa: S106 (moto's fixed test credentials)
        )

    def stop(self) -> None:
        terminate(self._proc, 10)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()


def wait_for(what: str, probe: Callable[[], T], timeout: float = 60.0) -> T:
    """Poll ``probe`` until it returns something truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_for_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


def free_port() -> int:
    """For servers that cannot report the port they chose (pynetdicom's listen port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
