"""Keeps the stage processes of the embedded default running.

Each stage is its own process (`python -m dicomflow <stage>`), exactly as in a
Kubernetes Deployment, so a crash of one does not take the others down; a stage that
exits unexpectedly is restarted with backoff. Stopping goes downstream: the gateway
first (no new intake), then the encryptor, then the store writer, each given time to
finish in-flight work.

A stage's exit code says whether a restart can help (``shared/stage/runner.py``): 2
(``EXIT_CONFIG``) is a configuration error -- a bad setting, a key file, a metrics port
that is taken -- which the same configuration hits again, so ``supervise`` raises
``StageMisconfigured`` with the stage's own error line instead of restarting it; any
other exit (1, a signal) is a crash and is restarted with backoff.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from dicomflow.embedded.process import die_with_parent, terminate
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.stage.runner import EXIT_CONFIG

log = logging.getLogger(__name__)

STOP_TIMEOUT = 40.0
LOG_TAIL = 16 * 1024  # bytes of a stage's log searched for its error line
CONFIG_ERROR = "configuration error: "  # how runner and main print one


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
    ) -> None:
        """``owned``: the stage is SIGKILLed when this process ends, however it ends
        (``process.die_with_parent``; start and supervise it from the main thread)."""
        self.stage = stage
        self._owned = owned
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
                f"{self.stage} cannot start: {self.error_line()} (log: {self._log_path}); "
                "not restarted"
            )
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
