"""A dicomflow pipeline of real stage processes against a real nats-server, for tests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from dicomflow.shared.contracts import subjects
from dicomflow.shared.crypto.keyring import generate_master_key_file
from dicomflow.shared.crypto.sealsign import generate_signing_key_pair
from nats.js.errors import NotFoundError

from dicomflow.embedded.layout import to_toml
from dicomflow.embedded.natsserver import NatsServer
from dicomflow.embedded.supervisor import StageProcess, stage_env
from support.dicomfiles import Made
from support.servers import free_port, wait_for_port

STORESCU = "/usr/bin/storescu"  # DCMTK's, not pynetdicom's app of the same name
_METRICS_AT = re.compile(r"metrics and probes on http://[^:]+:(\d+)")
STAGES = ("store-writer", "encryptor", "scp-gateway")
SCU_STAGE = "scu-gateway"

# storescu proposes uncompressed syntaxes only, unless told which one to propose; with
# the right flag and -R it sends each file in its own transfer syntax, unconverted.
PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.5": "-xr",
}


@dataclass
class StoreResult:
    returncode: int
    output: str

    def statuses(self) -> list[str]:
        """The status of every C-STORE response, in order (storescu -v)."""
        return re.findall(r"Received Store Response \(([^)]*)\)", self.output)


PORT_RACES = 3  # new free ports tried when another process took the gateway's


@dataclass
class Pipeline:
    root: Path
    nats: NatsServer
    storage: dict[str, Any]
    allowed: list[str] = field(default_factory=lambda: ["STORESCU"])
    ae_title: str = "DICOMFLOW"
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    scu: dict[str, Any] | None = None  # the [scu] table; set, the scu-gateway runs too
    # More processes of a stage, e.g. {"store-writer": 1}: named "store-writer-2", ...
    # each with a log folder of its own; start() and stop() include them.
    more: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.key = self.root / "keys" / "master-1.key"
        self.key.parent.mkdir(parents=True, exist_ok=True)
        generate_master_key_file(self.key)
        # The encryptor signs what it seals with signing_key; store-writers trust its pair.
        self.signing_key, self.signing_public = generate_signing_key_pair(self.key.parent)
        self.config = self.root / "dicomflow.toml"
        self.write_config()
        env = stage_env(self.config)
        self.names = (*STAGES, SCU_STAGE) if self.scu is not None else STAGES
        self.stages = {
            name: StageProcess(name, self.config, self.root / "logs", env) for name in self.names
        }
        self._stage_of = {name: name for name in self.names}
        for stage, count in self.more.items():
            for n in range(2, count + 2):
                name = f"{stage}-{n}"
                logs = self.root / "logs" / name
                self.stages[name] = StageProcess(stage, self.config, logs, env)
                self._stage_of[name] = stage
                self.names = (*self.names, name)

    def write_config(self) -> None:
        tables: dict[str, dict[str, Any]] = {
            # Small stream bounds: nats-server reserves each stream's max_bytes on disk
            # when it creates it, and CI disks are shared. 3 GiB blob buckets still hold
            # the 2 GiB + 1 B object of the large-object test.
            "nats": {
                "servers": [self.nats.url],
                "publish_timeout": 3.0,
                "ingest_max_bytes": 1024**3,
                "blob_max_bytes": 3 * 1024**3,
            },
            "scp": {
                "ae_title": self.ae_title,
                "host": "127.0.0.1",
                "port": self.port,
                "allowed_calling_aes": self.allowed,
            },
            "storage": self.storage,
            "encryption": {
                "master_key": {"id": 1, "path": self.key},
                "signing_key": self.signing_key,
                "trusted_signing_keys": [self.signing_public],
            },
            "consumer": {"ack_wait": 10.0, "backoff_initial": 0.2, "backoff_max": 2.0},
            # Every stage serves /metrics, /livez, /readyz on a free loopback port it logs.
            "telemetry": {"metrics_host": "127.0.0.1", "metrics_port": 0},
        }
        if self.scu is not None:
            tables["scu"] = self.scu
        for name, values in self.extra.items():
            tables.setdefault(name, {}).update(values)
        self.config.write_text(to_toml(tables))

    def start(self, *names: str, timeout: float = 60.0) -> Pipeline:
        """Start stages and wait until each logged that it is ready (topology set up)."""
        names = names or self.names
        ready = {name: f'"{self._stage_of[name]} ready' for name in names}
        before = {name: self.logs(name).count(ready[name]) for name in names}
        for name in names:
            self.stages[name].start()
        deadline = time.monotonic() + timeout
        for name in names:
            port_races = 0
            while self.logs(name).count(ready[name]) <= before[name]:
                exited = self.stages[name].exit_code() is not None
                if exited and self._lost_port_race(name) and port_races < PORT_RACES:
                    # The free port picked for the DICOM listener was taken by another
                    # process before the gateway bound it: pick another and start again.
                    port_races += 1
                    self.port = free_port()
                    self.write_config()
                    self.stages[name].start()
                    continue
                if time.monotonic() > deadline or exited:
                    self.stop()  # no stage outlives a start that failed
                    raise RuntimeError(f"{name} did not become ready:\n{self.logs(name)[-3000:]}")
                time.sleep(0.05)
        if "scp-gateway" in names:
            wait_for_port(self.port)
        return self

    def _lost_port_race(self, name: str) -> bool:
        tail = self.logs(name)[-4000:]
        return self._stage_of[name] == "scp-gateway" and "Address already in use" in tail

    def kill(self, name: str) -> None:
        self.stages[name].kill()

    def stop(self) -> None:
        for name in reversed(self.names):
            self.stages[name].stop(timeout=15)

    def metrics_port(self, name: str) -> int:
        """The port the stage's current process serves its metrics and probes on."""
        ports = _METRICS_AT.findall(self.logs(name))
        if not ports:
            raise RuntimeError(
                f"{name} has not logged its metrics port:\n{self.logs(name)[-2000:]}"
            )
        return int(ports[-1])

    def logs(self, name: str) -> str:
        stage = self._stage_of.get(name, name)
        folder = self.root / "logs" if stage == name else self.root / "logs" / name
        path = folder / f"{stage}.log"
        return path.read_text() if path.exists() else ""

    # -- sending ---------------------------------------------------------------------
    def send(self, files: Iterable[Made], **kwargs: Any) -> StoreResult:
        """Send each file in its own transfer syntax (one storescu run per syntax)."""
        results = []
        by_syntax: dict[str, list[Path]] = {}
        for f in files:
            by_syntax.setdefault(f.transfer_syntax, []).append(f.path)
        for syntax, paths in by_syntax.items():
            results.append(self.storescu(paths, propose=PROPOSE[syntax], **kwargs))
        return StoreResult(max(r.returncode for r in results), "\n".join(r.output for r in results))

    def storescu(
        self,
        files: Iterable[Path],
        calling: str = "STORESCU",
        called: str | None = None,
        timeout: float = 300,
        propose: str = "-xe",
    ) -> StoreResult:
        env = dict(os.environ, TCP_NODELAY="1")
        proc = subprocess.run(
            [
                STORESCU,
                "-v",
                "-R",
                propose,
                "-aet",
                calling,
                "-aec",
                called or self.ae_title,
                "127.0.0.1",
                str(self.port),
                *[str(f) for f in files],
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
        return StoreResult(proc.returncode, proc.stdout + proc.stderr)

    # -- reading ---------------------------------------------------------------------
    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dicomflow", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
            env=dict(os.environ, DICOMFLOW_CONFIG=str(self.config)),
        )

    def records(self) -> dict[str, dict[str, Any]]:
        out = self.cli("ls", "--json", "--config", str(self.config), check=True).stdout
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        return {r["sop_instance_uid"]: r for r in records}

    def wait_stored(self, count: int, timeout: float = 120.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            stored = {k: r for k, r in self.records().items() if r["state"] == "stored"}
            if len(stored) >= count or time.monotonic() > deadline:
                return stored
            time.sleep(0.5)

    def wait_drained(self, timeout: float = 120.0) -> None:
        """Until INGEST and SEALED are empty and no consumer has pending or unacked work."""
        deadline = time.monotonic() + timeout
        while not asyncio.run(self._drained()):
            if time.monotonic() > deadline:
                raise TimeoutError("pipeline did not drain")
            time.sleep(0.3)

    async def _drained(self) -> bool:
        nc = await nats.connect(self.nats.url)
        try:
            js = nc.jetstream()
            for stream in (subjects.INGEST_STREAM, subjects.SEALED_STREAM):
                if (await js.stream_info(stream)).state.messages:
                    return False
            return True
        finally:
            await nc.close()

    def pending_deliveries(self) -> int:
        """Delivery requests not yet acked (the DELIVERY stream is a work queue)."""
        return asyncio.run(self._stream_messages(subjects.DELIVERY_STREAM))

    async def _stream_messages(self, stream: str) -> int:
        nc = await nats.connect(self.nats.url)
        try:
            count: int = (await nc.jetstream().stream_info(stream)).state.messages
            return count
        finally:
            await nc.close()

    def dead_letters(self) -> list[dict[str, str]]:
        return asyncio.run(self._dead_letters())

    async def _dead_letters(self) -> list[dict[str, str]]:
        nc = await nats.connect(self.nats.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(subjects.DLQ_STREAM)
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                if info.state.messages == 0:
                    break
                try:
                    msg = await js.get_msg(subjects.DLQ_STREAM, seq)
                except NotFoundError:  # deleted by a replay
                    continue
                out.append(dict(msg.headers or {}))
            return out
        finally:
            await nc.close()
