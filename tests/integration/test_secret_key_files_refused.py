"""Real stage processes: a master key other users may read stops the encryptor with the
chmod to run; running stages cannot dump core (limit 0 0, not dumpable)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dicomflow.embedded.natsserver import NatsServer
from dicomflow.embedded.process import terminate
from support.pipeline import Pipeline
from support.servers import wait_for

pytestmark = pytest.mark.integration

NO_CORE = re.compile(r"^Max core file size\s+0\s+0\s+bytes\s*$", re.MULTILINE)


def _pipeline(root: Path, nats_server: NatsServer) -> Pipeline:
    return Pipeline(root / "p", nats_server, {"backend": "local", "local_path": root / "objects"})


def test_encryptor_refuses_a_master_key_others_may_read(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    pipeline = _pipeline(tmp_path, nats_server)
    pipeline.key.chmod(0o644)
    proc = subprocess.run(
        [sys.executable, "-m", "dicomflow", "encryptor", "--config", str(pipeline.config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        f"configuration error: master key file {pipeline.key} is open to its group and other "
        f"users (mode 0644); a secret must be readable by its owner only: run "
        f"`chmod 600 {pipeline.key}`"
    ) in proc.stderr, proc.stderr


# Run as `dicomflow` runs (cli.main.run, which ends with exit_process and so runs atexit
# callbacks): at exit, print what the process's own kernel state says about core dumps.
PROBE = """
import atexit, ctypes, resource, sys
def report():
    dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
    print("core:", dumpable, *resource.getrlimit(resource.RLIMIT_CORE), file=sys.stderr)
atexit.register(report)
sys.argv = ["dicomflow", *sys.argv[1:]]
from dicomflow.cli.main import run
run()
"""


def test_running_stages_cannot_dump_core(tmp_path: Path, nats_server: NatsServer) -> None:
    """Core file size limit 0, soft and hard, in every running stage; not dumpable."""
    pipeline = _pipeline(tmp_path, nats_server)
    pipeline.key.chmod(0o400)  # owner read-only is as good as 0600
    pipeline.start("store-writer", "encryptor")
    try:
        for name in ("store-writer", "encryptor"):
            pid = pipeline.stages[name].pid
            assert pid is not None
            limits = Path(f"/proc/{pid}/limits").read_text()
            assert NO_CORE.search(limits), f"{name}:\n{limits}"
        # One more encryptor, probed: not dumpable while it worked (reported at exit).
        log = tmp_path / "probed-encryptor.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", PROBE, "encryptor", "--config", str(pipeline.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for("the probed encryptor", lambda: '"encryptor ready' in log.read_text())
        finally:
            terminate(proc, 30)
        assert proc.returncode == 0, log.read_text()
        assert "core: 0 0 0" in log.read_text().splitlines(), log.read_text()
    finally:
        pipeline.stop()


@pytest.mark.parametrize(
    "command",
    [["keys", "new", "{tmp}/master.key"], ["keys", "new-signing", "--out", "{tmp}"], ["--help"]],
)
def test_every_command_is_not_dumpable(tmp_path: Path, command: list[str]) -> None:
    """Whatever the command (these write keys), the process is not dumpable and its core
    limit is 0 0 by the time it works."""
    argv = [part.format(tmp=tmp_path) for part in command]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "core: 0 0 0" in proc.stderr.splitlines(), proc.stderr
