"""Keeps the nats-server and the stage processes of `up`, `edge` and `cloud` running.

Each stage is its own process (`python -m dicomflow <stage>`), exactly as in a
Kubernetes Deployment, so a crash of one does not take the others down; a stage that
exits unexpectedly is restarted with backoff. A stage may run as several processes
(replicas, ``Supervisor.add``): the consumer stages share their durable pull consumer,
the scp-gateways share the DICOM port (``scp.reuse_port``); each has its own log and
metrics port. Stopping goes downstream: the gateways first (no new intake), then the
encryptors, then the store writers, each given time to finish in-flight work; the
replicas of one stage stop together.

A stage's exit code says whether a restart can help (``shared/stage/runner.py``): 2
(``EXIT_CONFIG``) is a configuration error -- a bad setting, a key file, a metrics port
that is taken -- which the same configuration hits again, so ``supervise`` raises
``StageMisconfigured`` with the stage's own error line instead of restarting it; any
other exit (1, a signal) is a crash and is restarted with backoff.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from itertools import groupby
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO

from dicomflow.embedded.natsserver import NatsServer
from dicomflow.embedded.process import die_with_parent, terminate_all
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.stage.runner import EXIT_CONFIG

log = logging.getLogger(__name__)

STOP_TIMEOUT = 40.0
LOG_TAIL = 16 * 1024  # bytes of a stage's log searched for its error line
CONFIG_ERROR = "configuration error: "  # how runner and main print one
METRICS_PORT_ENV = "DICOMFLOW_TELEMETRY__METRICS_PORT"
PORT_WAIT = 60.0  # seconds `up` and `edge` wait for the DICOM port before going on


class StageMisconfigured(ConfigError):
    """A stage exited with the configuration-error code: restarting it cannot help."""


class StageProcess:
    def __init__(
        self,
        stage: str,
        config: Path,
        log_dir: Path,
        env: dict[str, str],
        *,
        owned: bool = False,
        replica: int = 0,
    ) -> None:
        """``owned``: the stage is SIGKILLed when this process ends, however it ends
        (``process.die_with_parent``; start and supervise it from the main thread).
        ``replica``: which process of the stage this is; the first is named and logs as
        the stage (``encryptor.log``), the others with their number (``encryptor-2.log``)."""
        self.stage = stage
        self.name = stage if replica == 0 else f"{stage}-{replica + 1}"
        self._owned = owned
        self._config = config
        self._log_path = log_dir / f"{self.name}.log"
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.restarts = 0
        self._next_start = 0.0

    def start(self) -> None:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is not None:
            self._log.close()
        self._log = self._log_path.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dicomflow", self.stage, "--config", str(self._config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._env,
            # Own session: a Ctrl-C in the terminal reaches `up` only, which then stops
            # the stages in order; otherwise every stage would get the signal at once.
            start_new_session=True,
            preexec_fn=die_with_parent() if self._owned else None,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def supervise(self) -> None:
        """Restart the stage if it exited, with exponential backoff up to 30 s; raise
        ``StageMisconfigured`` if it exited on a configuration error."""
        code = self.exit_code()
        if code is None:
            return
        if code == EXIT_CONFIG:
            raise StageMisconfigured(
                f"{self.name} cannot start: {self.error_line()} (log: {self._log_path}); "
                "not restarted"
            )
        now = time.monotonic()
        if self._next_start == 0.0:
            delay = min(2.0 ** min(self.restarts, 5), 30.0)
            self._next_start = now + delay
            log.warning(
                "%s exited with code %s; restarting in %.0fs (see %s)",
                self.name,
                code,
                delay,
                self._log_path,
            )
            print(
                f"dicomflow: {self.name} exited with code {code}; restarting in {delay:.0f}s "
                f"(log: {self._log_path})",
                file=sys.stderr,
            )
        elif now >= self._next_start:
            self._next_start = 0.0
            self.restarts += 1
            self.start()

    def error_line(self) -> str:
        """What the stage last printed as a configuration error, else its last log line."""
        try:
            with self._log_path.open("rb") as f:
                f.seek(max(f.seek(0, os.SEEK_END) - LOG_TAIL, 0))
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError as exc:
            return f"its log cannot be read ({exc.strerror})"
        for line in reversed(lines):
            _, found, reason = line.partition(CONFIG_ERROR)
            if found and not line.startswith("{"):  # the plain line, not the JSON log record
                return reason.strip()
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        return last[:300] or "no output"

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it; no drain, no cleanup."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        stop_together([self], timeout)

    def _closed(self, killed: bool, timeout: float) -> None:
        if killed:
            log.warning("%s did not stop in %.0fs; killed it", self.name, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_together(stages: Sequence[StageProcess], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM to each (once: a second signal makes a stage exit at once), then up to
    ``timeout`` for all of them to finish their in-flight work; SIGKILL whoever is left."""
    killed = terminate_all([stage._proc for stage in stages], timeout)
    for stage, was_killed in zip(stages, killed, strict=True):
        stage._closed(was_killed, timeout)


def stage_env(config: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DICOMFLOW_CONFIG"] = str(config)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def metrics_port(base: int, order: Sequence[str], stage: str, replica: int = 0) -> int:
    """The loopback metrics port of a stage's process: 0 (each picks a free one and logs
    it) if ``base`` is 0; else ``base`` plus the stage's place in ``order``, one more
    round of ``len(order)`` ports for each further replica (so the first process of each
    stage keeps the port it has without replicas)."""
    return 0 if base == 0 else base + order.index(stage) + replica * len(order)


class StopFlag:
    """Set from a signal handler, polled by the main loop.

    Not a ``threading.Event``: its ``set`` takes a lock that ``wait`` holds, so a signal
    arriving while the main thread waits on it deadlocks (seen with a second SIGTERM).
    Setting a plain attribute is safe at any point.
    """

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (in short steps); True once the flag is set."""
        deadline = time.monotonic() + seconds
        while not self._set and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._set


class Supervisor:
    """The nats-server and stage processes of one command, from start to stop.

    Used as a context manager: entering makes SIGINT and SIGTERM set ``stop``; leaving,
    however it is left, stops the stages (downstream order, replicas together) and then
    the nats-server. Start every child from the main thread (``owned``)."""

    def __init__(
        self,
        config: Path,
        logs: Path,
        *,
        metrics_base: int,
        metrics_order: Sequence[str],
        owned: bool = False,
        revive: str | None = None,
    ) -> None:
        """``metrics_order``: every stage the command may run, in the order of their
        metrics ports (``metrics_port``); ``revive``: what to call the nats-server when
        it is restarted after dying (None: it is not)."""
        self.stop = StopFlag()
        self.stages: list[StageProcess] = []
        self._config = config
        self._logs = logs
        self._metrics_base = metrics_base
        self._metrics_order = tuple(metrics_order)
        self._owned = owned
        self._revive = revive
        self._nats: NatsServer | None = None

    def __enter__(self) -> Supervisor:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()

    def start_nats(self, server: NatsServer) -> NatsServer:
        self._nats = server.start()
        return self._nats

    def add(self, stage: str, env: dict[str, str], replicas: int = 1) -> None:
        """``replicas`` processes of ``stage``, each with ``env`` over ``stage_env`` and
        its own metrics port; started downstream first, in the order added."""
        for replica in range(replicas):
            port = metrics_port(self._metrics_base, self._metrics_order, stage, replica)
            self.stages.append(
                StageProcess(
                    stage,
                    self._config,
                    self._logs,
                    {**stage_env(self._config), **env, METRICS_PORT_ENV: str(port)},
                    owned=self._owned,
                    replica=replica,
                )
            )

    def start(self) -> None:
        for stage in self.stages:
            stage.start()

    def restart(self) -> None:
        """Stop every stage and start it again (a changed configuration)."""
        for stage in self.stages:
            stage.stop()
            stage.start()

    def supervise(self) -> None:
        """One look: revive a dead nats-server (if asked to), restart exited stages."""
        if self._revive is not None and self._nats is not None and self._nats.revive():
            print(f"dicomflow: the {self._revive} nats-server died; restarted it", file=sys.stderr)
        for stage in self.stages:
            stage.supervise()

    def wait_for_port(self, host: str, port: int) -> bool:
        """Until something accepts on ``host:port`` (a gateway listens), supervising
        meanwhile; False if stopped first or after ``PORT_WAIT`` seconds."""
        probe = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
        deadline = time.monotonic() + PORT_WAIT
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with socket.create_connection((probe, port), timeout=0.5):
                    return True
            except OSError:
                self.supervise()
                self.stop.wait(0.2)
        return False

    def run(self, every: Callable[[], None] | None = None) -> None:
        """Supervise until a signal sets ``stop``; ``every`` is called at each look."""
        while not self.stop.wait(0.5):
            self.supervise()
            if every is not None:
                every()

    def shutdown(self) -> None:
        stages = list(reversed(self.stages))
        self.stages = []
        try:
            for _, group in groupby(stages, key=lambda stage: stage.stage):
                stop_together(list(group))
        finally:
            if self._nats is not None:
                self._nats.stop()
                self._nats = None
