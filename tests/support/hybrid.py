"""The hybrid edge on one machine, as an operator starts it: `dicomflow cloud` and
`dicomflow edge --join` as processes, the leafnode link of each site through a cuttable
TCP proxy (``support.linkproxy``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from dicomflow.encryptor.settings import EncryptorSettings
from dicomflow.shared.nats import natsconn
from dicomflow.shared.settings import ReaderSettings, load_settings
from dicomflow.shared.storage.index import Index, Record, State

from support.dicomfiles import Made
from support.linkproxy import LinkProxy
from support.pipeline import STORESCU
from support.servers import wait_for


def _dicomflow(log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dicomflow", *args], stdout=out, stderr=subprocess.STDOUT
        )


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomflow", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=90)


def nats_server_pid(proc: subprocess.Popen[bytes]) -> int:
    children = psutil.Process(proc.pid).children(recursive=True)
    servers = [c.pid for c in children if c.name() == "nats-server"]
    assert len(servers) == 1, children
    return servers[0]


@dataclass
class Hybrid:
    """One cloud and one site's edge (``name``: its folder, bundle and log names), the
    edge's link to the cloud through ``proxy``. Another site of the same cloud is a
    second Hybrid on the same ``root`` that does not start the cloud."""

    root: Path
    proxy: LinkProxy
    leafnode_port: int
    dicom_port: int
    site: str = "site-a"
    name: str = "edge"
    forward: list[str] = field(default_factory=list)
    routing: Path | None = None
    calling_aes: tuple[str, ...] = ("CT01",)
    cloud_proc: subprocess.Popen[bytes] | None = None
    edge_proc: subprocess.Popen[bytes] | None = None
    sent: list[Made] = field(default_factory=list)

    @property
    def cloud(self) -> Path:
        return self.root / "cloud"

    @property
    def edge(self) -> Path:
        return self.root / self.name

    @property
    def bundle(self) -> Path:
        return self.root / ("bundle" if self.name == "edge" else f"bundle-{self.name}")

    def add_site(self) -> None:
        added = cli(
            "cloud",
            "add-site",
            self.site,
            "--data-dir",
            str(self.cloud),
            "--out",
            str(self.bundle),
            "--cloud-url",
            f"tls://127.0.0.1:{self.proxy.port}",
        )
        assert added.returncode == 0, added.stderr

    def start_cloud(self) -> None:
        mark = self.log("cloud").count("dicomflow cloud is up")
        routing = ["--routing", str(self.routing)] if self.routing is not None else []
        self.cloud_proc = _dicomflow(
            self.root / "cloud.log",
            "cloud",
            "--data-dir",
            str(self.cloud),
            "--leafnode-host",
            "127.0.0.1",
            "--leafnode-port",
            str(self.leafnode_port),
            "--metrics-port",
            "0",
            *routing,
        )
        wait_for("the cloud", lambda: self.log("cloud").count("dicomflow cloud is up") > mark, 90)

    def stop_cloud(self) -> None:
        assert self.cloud_proc is not None
        assert stop(self.cloud_proc) == 0, self.log("cloud")[-3000:]
        self.cloud_proc = None

    def start_edge(self) -> None:
        mark = self.log(self.name).count("is up.")
        forward = [a for f in self.forward for a in ("--forward", f)]
        self.edge_proc = _dicomflow(
            self.root / f"{self.name}.log",
            "edge",
            "--join",
            str(self.bundle),
            "--data-dir",
            str(self.edge),
            "--port",
            str(self.dicom_port),
            "--host",
            "127.0.0.1",
            *(a for ae in self.calling_aes for a in ("--allow-ae", ae)),
            "--objects",
            str(self.cloud / "objects"),
            "--metrics-port",
            "0",
            *forward,
        )
        wait_for("the edge", lambda: self.log(self.name).count("is up.") > mark, 90)

    def stop_edge(self) -> None:
        assert self.edge_proc is not None
        assert stop(self.edge_proc) == 0, self.log(self.name)[-3000:]
        self.edge_proc = None

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def send(self, files: list[Made]) -> str:
        done = subprocess.run(
            [
                STORESCU,
                "-v",
                "-aet",
                "CT01",
                "-aec",
                "DICOMFLOW",
                "127.0.0.1",
                str(self.dicom_port),
                *(str(f.path) for f in files),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
        self.sent += files
        return done.stdout + done.stderr

    def settings(self, side: str) -> ReaderSettings:
        """``side``: "cloud", or "edge" (this site's edge)."""
        folder = self.edge if side == "edge" else self.root / side
        return load_settings(ReaderSettings, folder / "dicomflow.toml")

    def edge_sealed(self) -> EncryptorSettings:
        settings = load_settings(EncryptorSettings, self.edge / "dicomflow.toml")
        assert settings.nats_sealed is not None
        sealed = settings.nats_sealed.model_copy(
            update={"nkey_seed_file": self.edge / "keys" / "nats" / "creds" / "edge-admin.nk"}
        )
        return settings.model_copy(update={"nats_sealed": sealed})


async def messages(hybrid: Hybrid, side: str, stream: str) -> int:
    if side == "edge-sealed":
        nats_settings = hybrid.edge_sealed().nats_sealed
        assert nats_settings is not None
    else:
        nats_settings = hybrid.settings(side).nats
    nc = await natsconn.connect_once(nats_settings, "test")
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def stored(hybrid: Hybrid) -> dict[str, tuple[str, str]]:
    """``{SOP Instance UID: (object key, sha256)}`` of every stored record in the cloud."""
    nc = await natsconn.connect_once(hybrid.settings("cloud").nats, "test")
    try:
        index = await Index.open(nc.jetstream())
        return {
            r.sop_instance_uid: (r.object_key, r.sha256)
            async for r in index.entries()
            if isinstance(r, Record) and r.state is State.STORED
        }
    finally:
        await nc.close()
