"""Keeps the stage processes of the embedded default running.

Each stage is its own process (`python -m dicomflow <stage>`), exactly as in a
Kubernetes Deployment, so a crash of one does not take the others down; a stage that
exits unexpectedly is restarted with backoff. Stopping goes downstream: the gateway
first (no new intake), then the encryptor, then the store writer, each given time to
finish in-flight work.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from dicomflow.embedded.process import terminate

log = logging.getLogger(__name__)

STOP_TIMEOUT = 40.0


class StageProcess:
    def __init__(self, stage: str, config: Path, log_dir: Path, env: dict[str, str]) -> None:
        self.stage = stage
        self._config = config
        self._log_path = log_dir / f"{stage}.log"
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
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def supervise(self) -> None:
        """Restart the stage if it exited, with exponential backoff up to 30 s."""
        code = self.exit_code()
        if code is None:
            return
        now = time.monotonic()
        if self._next_start == 0.0:
            delay = min(2.0 ** min(self.restarts, 5), 30.0)
            self._next_start = now + delay
            log.warning(
                "%s exited with code %s; restarting in %.0fs (see %s)",
                self.stage,
                code,
                delay,
                self._log_path,
            )
            print(
                f"dicomflow: {self.stage} exited with code {code}; restarting in {delay:.0f}s "
                f"(log: {self._log_path})",
                file=sys.stderr,
            )
        elif now >= self._next_start:
            self._next_start = 0.0
            self.restarts += 1
            self.start()

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would end it; no drain, no cleanup."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if terminate(self._proc, timeout):
            log.warning("%s did not stop in %.0fs; killed it", self.stage, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None


def stage_env(config: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DICOMFLOW_CONFIG"] = str(config)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
