"""Orthanc (Debian package ``orthanc``) as a real remote PACS for tests.

Orthanc cannot report a port it chose itself, so both ports come from ``free_port``;
readiness is ``GET /system`` answering. Its DICOM server is DCMTK's, which leaves Nagle
on unless TCP_NODELAY=1 is in its environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from dicomflow.embedded.process import terminate
from support.dicomfiles import dataset_bytes
from support.servers import free_port

ORTHANC = "/usr/sbin/Orthanc"


class Orthanc:
    def __init__(
        self, root: Path, *, ae_title: str = "ORTHANC", peers: tuple[str, ...] = ("DICOMFLOW",)
    ) -> None:
        self.root = root
        self.ae_title = ae_title
        self.peers = peers
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = root / "orthanc.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": f"dicomflow-test-{self.ae_title}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "DicomCheckCalledAet": True,  # a wrong called AE is rejected, as a PACS would
            "DicomModalities": {peer.lower(): [peer, "127.0.0.1", 104] for peer in self.peers},
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "Plugins": [],
            "SaveJobs": False,
        }

    def start(self, timeout: float = 60.0) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [ORTHANC, str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, TCP_NODELAY="1"),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited:\n{self.log.read_text()[-3000:]}")
            try:
                self.get("/system")
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)
            else:
                return self

    def stop(self, timeout: float = 20.0) -> None:
        proc = self._proc
        if proc is None:
            return
        terminate(proc, timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled cable ends it: open associations just drop.

        (A graceful stop waits for open associations to end, so a sender that keeps its
        association open would finish its whole batch first.)"""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST ------------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=10) as rsp:  # noqa: S310 (loopback)
            return json.loads(rsp.read())

    def raw(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=30) as rsp:  # noqa: S310 (loopback)
            data: bytes = rsp.read()
            return data

    def instances(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc instance id, of everything Orthanc stored."""
        return {
            item["MainDicomTags"]["SOPInstanceUID"]: item["ID"]
            for item in self.get("/instances?expand")
        }

    def dataset_bytes(self, orthanc_id: str) -> bytes:
        """The stored file's encoded dataset after its file meta (as dicomfiles reads it)."""
        with tempfile.NamedTemporaryFile(dir=self.root, suffix=".dcm") as f:
            f.write(self.raw(f"/instances/{orthanc_id}/file"))
            f.flush()
            return dataset_bytes(Path(f.name))
