"""The scp-gateway's spool pieces on a real file system: the privacy checks of
``scp.spool_dir``, the count that stops a dataset's file at the limit, and the fence
that keeps the file factory of any pynetdicom but the verified one untouched."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pynetdicom
import pytest
from dicomflow.scp_gateway.spool import (
    FOLDER_PREFIX,
    VERIFIED_PYNETDICOM,
    Received,
    Spool,
    SpoolFile,
    private_folder,
)
from dicomflow.shared.errors import ConfigError
from pynetdicom import dimse_messages


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Spool]:
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # install() sets it
    opened = Spool.open(tmp_path / "scp", None, limit=1000)
    yield opened
    opened.close()
    assert dimse_messages.NamedTemporaryFile is tempfile.NamedTemporaryFile


def test_a_missing_spool_dir_is_created_0700_whatever_the_umask(tmp_path: Path) -> None:
    before = os.umask(0o000)
    try:
        folder = private_folder(tmp_path / "data" / "spool")
    finally:
        os.umask(before)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o750, 0o705, 0o777])
def test_a_spool_dir_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(ConfigError, match=rf"open to group or others \(mode 0{mode:o}\)"):
        private_folder(folder)


def test_a_spool_dir_of_another_user_or_a_file_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/")  # root's
    with pytest.raises(ConfigError, match="not by the gateway's user"):
        private_folder(theirs)
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    with pytest.raises(ConfigError, match="is not a folder"):
        private_folder(a_file)


def test_the_spool_is_a_claimed_private_folder_under_scp_spool_dir(spool: Spool) -> None:
    assert spool.path.name.startswith(FOLDER_PREFIX)
    assert stat.S_IMODE(spool.path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(spool.path.stat().st_mode) == 0o700


def test_a_file_past_the_limit_is_removed_and_the_rest_only_counted(spool: Spool) -> None:
    closed: list[SpoolFile] = []
    f = SpoolFile(spool.path, 1000, closed.append)
    assert stat.S_IMODE(Path(f.name).stat().st_mode) == 0o600
    f.write(b"x" * 600)
    f.file.flush()
    assert Path(f.name).stat().st_size == 600
    f.write(b"x" * 600)  # 1200 > 1000: this write is not made
    assert not Path(f.name).exists()
    f.write(b"x" * 600)
    f.file.flush()
    assert (f.received, f.over_limit) == (1800, True)
    f.close()
    f.close()
    assert closed == [f, f]


def test_the_factory_is_replaced_on_the_verified_pynetdicom_only(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert pynetdicom.__version__ == VERIFIED_PYNETDICOM  # what the lock file pins
    monkeypatch.setattr(pynetdicom, "__version__", "3.0.5")
    with caplog.at_level(logging.WARNING):
        assert spool.install() is False
    assert dimse_messages.NamedTemporaryFile is tempfile.NamedTemporaryFile
    assert "pynetdicom 3.0.5 is not 3.0.4" in caplog.text
    assert tempfile.tempdir == str(spool.path)  # its own files still go to the spool
    monkeypatch.setattr(pynetdicom, "__version__", VERIFIED_PYNETDICOM)
    assert spool.install() is True
    made = dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")
    assert isinstance(made, SpoolFile) and Path(made.name).parent == spool.path
    made.write(b"y" * 10)
    assert spool.size_of(Path(made.name)) == 10
    made.close()
    assert not Path(made.name).exists()


def test_a_dataset_under_the_memory_limit_is_kept_in_memory_then_spilled_whole(
    spool: Spool,
) -> None:
    closed: list[SpoolFile] = []
    name = str(spool.path / "mem0.dcm")
    f = SpoolFile(spool.path, 1000, closed.append, memory_limit=500, name=name)
    f.write(b"a" * 300)
    f.file.flush()
    assert not Path(name).exists()
    kept = f.body()
    assert (kept.size, kept.data) == (300, b"a" * 300)
    assert kept.sha256 == hashlib.sha256(b"a" * 300).hexdigest()
    f.write(b"b" * 300)  # 600 > 500: to the file, with what came before
    f.file.flush()
    assert Path(name).read_bytes() == b"a" * 300 + b"b" * 300
    assert stat.S_IMODE(Path(name).stat().st_mode) == 0o600
    spilled = f.body()
    assert spilled.data is None
    assert spilled.sha256 == hashlib.sha256(b"a" * 300 + b"b" * 300).hexdigest()
    f.write(b"c" * 600)  # over the limit: removed, only counted, no digest
    assert not Path(name).exists()
    assert f.body() == Received(1200)
    f.close()
    assert closed == [f]
