"""Azurite, Microsoft's Azure Storage emulator (npm package ``azurite``), blob service only.

``scripts/bootstrap.sh --test`` installs it into ``.tools/``. It is started on port 0,
in memory, without telemetry, and reports the port it chose on stdout.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections import deque
from pathlib import Path

from dicomflow.embedded.process import terminate

BINARY = Path(__file__).resolve().parents[2] / ".tools" / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT = "devstoreaccount1"
# Azurite's fixed, publicly documented development key: not a secret.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
_LISTENING = re.compile(r"listens on http://127\.0\.0\.1:(\d+)")


class Azurite:
    def __init__(self) -> None:
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None
        self._lines: deque[str] = deque(maxlen=50)
        self._ready = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint={self.endpoint};"
        )

    def start(self, timeout: float = 60.0) -> Azurite:
        if not BINARY.exists():
            raise RuntimeError(f"{BINARY} is missing: run scripts/bootstrap.sh --test")
        self._proc = subprocess.Popen(
            [
                str(BINARY),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                "0",
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--silent",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError("azurite did not start:\n" + "\n".join(self._lines))
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line.rstrip())
            match = _LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
                self._ready.set()

    def stop(self) -> None:
        terminate(self._proc, 10)
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
