"""s3rver (npm package ``s3rver``): an S3 server that keeps its objects on disk.

Unlike moto it survives a restart with its objects, so it can be killed mid-upload and
started again on the same port and folder. ``scripts/bootstrap.sh --test`` installs it
into ``.tools/``. It serves PUT, multipart uploads, HEAD and GET as obstore uses them,
but ignores ``If-None-Match: *``: a conditional create overwrites instead of failing.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
from collections import deque
from pathlib import Path

from dicomflow.embedded.process import terminate

BINARY = Path(__file__).resolve().parents[2] / ".tools" / "node_modules" / ".bin" / "s3rver"
KEY = "S3RVER"  # s3rver's fixed, documented access key and secret: not a secret
_LISTENING = re.compile(r"S3rver listening on 127\.0\.0\.1:(\d+)")


class S3rver:
    def __init__(self, folder: Path, bucket: str) -> None:
        self.folder = folder
        self.bucket = bucket
        self.port = 0  # chosen by the first start, kept by every restart
        self._proc: subprocess.Popen[str] | None = None
        self._lines: deque[str] = deque(maxlen=50)
        self._ready = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def storage(self) -> dict[str, object]:
        """The dicomflow ``[storage]`` table for this server."""
        return {
            "backend": "s3",
            "s3_bucket": self.bucket,
            "s3_endpoint": self.endpoint,
            "s3_allow_http": True,
            "s3_access_key_id": KEY,
            "s3_secret_access_key": KEY,
        }

    def start(self, timeout: float = 30.0) -> S3rver:
        if not BINARY.exists():
            raise RuntimeError(f"{BINARY} is missing: run scripts/bootstrap.sh --test")
        self.folder.mkdir(parents=True, exist_ok=True)
        self._ready.clear()
        args = [str(BINARY), "-d", str(self.folder), "-a", "127.0.0.1", "-p", str(self.port)]
        self._proc = subprocess.Popen(
            [*args, "--configure-bucket", self.bucket],
            # A listing of more than 1000 keys needs a continuation token, which s3rver
            # enciphers with DES: OpenSSL 3 (Node 17+) serves it only from its legacy
            # provider. Without it the checker's listing failed with 500 after a long run.
            env={**os.environ, "NODE_OPTIONS": "--openssl-legacy-provider"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, args=(self._proc,), daemon=True).start()
        if not self._ready.wait(timeout):
            self.stop()
            raise RuntimeError("s3rver did not start:\n" + "\n".join(self._lines))
        return self

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        with proc.stdout:  # closed here, at the end of output, never under the reader
            for line in proc.stdout:
                self._lines.append(line.rstrip())
                match = _LISTENING.search(line)
                if match:
                    self.port = int(match.group(1))
                    self._ready.set()

    def kill(self) -> None:
        """SIGKILL: uploads in flight are cut off; what was on disk stays."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def stop(self) -> None:
        terminate(self._proc, 10)
        self._close()

    def _close(self) -> None:
        self._proc = None
