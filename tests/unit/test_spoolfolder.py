"""The scu-gateway's spool folders: claimed for a process's life, swept once it died."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dicomflow.scu_gateway.delivery import SPOOL_PREFIX as PREFIX
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.spoolfolder import LOCK_NAME, SpoolFolder, remove_orphans

HOLD = """
import fcntl, os, sys, tempfile
folder = tempfile.mkdtemp(dir=sys.argv[1], prefix="dicomflow-scu-PEER-")
open(os.path.join(folder, "0.dcm"), "wb").write(b"plaintext")
fd = os.open(os.path.join(folder, ".owner.lock"), os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print(folder, flush=True)
sys.stdin.read()
"""


def _holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(parent)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_a_live_process_keeps_its_folder_and_a_killed_one_loses_it(tmp_path: Path) -> None:
    proc, folder = _holder(tmp_path)
    with proc:  # closes its pipes
        try:
            assert remove_orphans(tmp_path, PREFIX) == 0
            assert (folder / "0.dcm").exists()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert remove_orphans(tmp_path, PREFIX) == 1
            assert not folder.exists()
        finally:
            proc.kill()


def test_a_new_spool_folder_sweeps_dead_ones_and_close_removes_its_own(tmp_path: Path) -> None:
    dead = tmp_path / f"{PREFIX}PEER-dead"
    dead.mkdir()
    (dead / LOCK_NAME).touch()  # claimed once; nobody holds it now
    (dead / "7.dcm").write_bytes(b"plaintext")
    other = tmp_path / "not-ours"
    other.mkdir()

    spool = SpoolFolder(tmp_path, "PEER", PREFIX, "scu-gateway")
    assert not dead.exists()
    assert other.exists()
    assert spool.path.parent == tmp_path and spool.path.name.startswith(f"{PREFIX}PEER-")
    assert oct(spool.path.stat().st_mode & 0o777) == oct(0o700)
    assert remove_orphans(tmp_path, PREFIX) == 0  # its own folder is held
    spool.close()
    assert not spool.path.exists()


def test_an_unclaimed_folder_is_left_alone_while_young(tmp_path: Path) -> None:
    young = tmp_path / f"{PREFIX}PEER-young"
    old = tmp_path / f"{PREFIX}PEER-old"
    young.mkdir()
    old.mkdir()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    assert remove_orphans(tmp_path, PREFIX) == 1
    assert young.exists() and not old.exists()


def test_an_unusable_spool_dir_is_a_config_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(ConfigError, match="a-file"):
        SpoolFolder(blocker / "spool", "PEER", PREFIX, "scu-gateway")
