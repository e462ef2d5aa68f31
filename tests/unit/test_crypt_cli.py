"""`dicomflow encrypt` / `dicomflow decrypt`: exit codes, one-line errors, no partial output."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dicomflow.shared.crypto.envelope import OVERHEAD, key_id_of, open_bytes, seal
from dicomflow.shared.crypto.keyring import KeyRing, MasterKey

from dicomflow.cli.main import main
from support.keyfiles import write_secret

KEK1 = bytes(range(32))
KEK2 = bytes(range(50, 82))


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name, content in {
        "k1": base64.b64encode(KEK1) + b"\n",
        "k2": base64.b64encode(KEK2) + b"\n",
        "short": base64.b64encode(bytes(16)) + b"\n",
    }.items():
        path = tmp_path / f"{name}.b64"
        paths[name] = write_secret(path, content)
    return paths


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_error_line(err: str, *fragments: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dicomflow: ")
    for fragment in fragments:
        assert fragment in lines[0]


# --- success --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100_000])
def test_encrypt_then_decrypt(
    tmp_path: Path,
    out_dir: Path,
    keys: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    size: int,
) -> None:
    plain = tmp_path / "in.dcm"
    plain.write_bytes(os.urandom(size))
    sealed = out_dir / "in.dcm.enc"
    restored = out_dir / "restored.dcm"

    assert _run(
        ["encrypt", "--master-key", f"1={keys['k1']}", str(plain), str(sealed)], capsys
    ) == (
        0,
        "",
        "",
    )
    obj = sealed.read_bytes()
    assert len(obj) == size + OVERHEAD
    assert key_id_of(obj) == 1
    assert open_bytes(KeyRing(MasterKey(1, KEK1)), obj) == plain.read_bytes()
    assert sealed.stat().st_mode & 0o777 == 0o600

    argv = ["decrypt", "--master-key", f"1={keys['k1']}", str(sealed), str(restored)]
    assert _run(argv, capsys) == (0, "", "")
    assert restored.read_bytes() == plain.read_bytes()
    assert sorted(p.name for p in out_dir.iterdir()) == ["in.dcm.enc", "restored.dcm"]


def test_decrypt_with_previous_key(
    tmp_path: Path, out_dir: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    sealed = tmp_path / "old.enc"
    sealed.write_bytes(seal(MasterKey(1, KEK1), b"sealed before rotation"))
    restored = out_dir / "plain"
    argv = [
        "decrypt",
        "--master-key",
        f"2={keys['k2']}",
        "--previous-key",
        f"1={keys['k1']}",
        str(sealed),
        str(restored),
    ]
    assert _run(argv, capsys) == (0, "", "")
    assert restored.read_bytes() == b"sealed before rotation"


@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--master-key ID=PATH" in out
    assert "INPUT" in out
    assert "OUTPUT" in out
    if command == "decrypt":
        assert "--previous-key ID=PATH" in out


# --- failures: one line on stderr, the right exit code, no OUTPUT ----------------------


def _tampered(kind: str) -> bytes:
    obj = seal(MasterKey(1, KEK1), os.urandom(5000))
    match kind:
        case "truncated":
            return obj[:85]
        case "version":
            return b"A2" + obj[2:]
        case "unknown-key":
            return seal(MasterKey(7, KEK1), b"payload")
        case "integrity":
            flipped = bytearray(obj)
            flipped[3000] ^= 0x10
            return bytes(flipped)
        case "cut-by-one":
            return obj[:-1]
    raise AssertionError(kind)


DECRYPT_FAILURES = [
    ("truncated", "truncated"),
    ("version", "unsupported version"),
    ("unknown-key", "unknown master key id 7"),
    ("integrity", "integrity check failed"),
    ("cut-by-one", "integrity check failed"),
]


@pytest.mark.parametrize(("kind", "fragment"), DECRYPT_FAILURES)
def test_decrypt_failures(
    tmp_path: Path,
    out_dir: Path,
    keys: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    kind: str,
    fragment: str,
) -> None:
    sealed = tmp_path / "obj.enc"
    sealed.write_bytes(_tampered(kind))
    argv = ["decrypt", "--master-key", f"1={keys['k1']}", str(sealed), str(out_dir / "plain")]
    code, out, err = _run(argv, capsys)
    assert code == 1
    assert out == ""
    _assert_one_error_line(err, fragment)
    assert list(out_dir.iterdir()) == []


def test_decrypt_wrong_key_same_id(
    tmp_path: Path, out_dir: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    sealed = tmp_path / "obj.enc"
    sealed.write_bytes(seal(MasterKey(1, KEK1), b"payload"))
    argv = ["decrypt", "--master-key", f"1={keys['k2']}", str(sealed), str(out_dir / "plain")]
    code, _, err = _run(argv, capsys)
    assert code == 1
    _assert_one_error_line(err, "integrity check failed")
    assert list(out_dir.iterdir()) == []


def test_failed_decrypt_keeps_existing_output(
    tmp_path: Path, out_dir: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    sealed = tmp_path / "obj.enc"
    sealed.write_bytes(_tampered("integrity"))
    existing = out_dir / "plain"
    existing.write_bytes(b"keep me")
    argv = ["decrypt", "--master-key", f"1={keys['k1']}", str(sealed), str(existing)]
    assert _run(argv, capsys)[0] == 1
    assert existing.read_bytes() == b"keep me"
    assert list(out_dir.iterdir()) == [existing]


@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing-input", "does not exist"),
        ("input-is-dir", "not a regular file"),
        ("bad-spec", "ID=PATH"),
        ("missing-key-file", "does not exist"),
        ("short-key", "decodes to 16 bytes"),
        ("missing-output-dir", "does not exist"),
        ("output-is-dir", "is a directory"),
    ],
)
def test_usage_errors_exit_2(
    tmp_path: Path,
    out_dir: Path,
    keys: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    command: str,
    case: str,
    fragment: str,
) -> None:
    src = tmp_path / "in"
    src.write_bytes(seal(MasterKey(1, KEK1), b"payload"))
    key_spec = f"1={keys['k1']}"
    output = out_dir / "result"
    match case:
        case "missing-input":
            src = tmp_path / "absent"
        case "input-is-dir":
            src = tmp_path
        case "bad-spec":
            key_spec = str(keys["k1"])
        case "missing-key-file":
            key_spec = f"1={tmp_path / 'absent.b64'}"
        case "short-key":
            key_spec = f"1={keys['short']}"
        case "missing-output-dir":
            output = out_dir / "absent" / "result"
        case "output-is-dir":
            output = out_dir
    code, out, err = _run([command, "--master-key", key_spec, str(src), str(output)], capsys)
    assert code == 2
    assert out == ""
    _assert_one_error_line(err, fragment)
    assert list(out_dir.iterdir()) == []


def test_missing_master_key_option_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["encrypt", str(tmp_path / "a"), str(tmp_path / "b")])
    assert info.value.code == 2
    assert "--master-key" in capsys.readouterr().err


def test_duplicate_key_ids_refused(
    tmp_path: Path, out_dir: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    sealed = tmp_path / "obj.enc"
    sealed.write_bytes(seal(MasterKey(1, KEK1), b"payload"))
    argv = [
        "decrypt",
        "--master-key",
        f"1={keys['k1']}",
        "--previous-key",
        f"1={keys['k2']}",
        str(sealed),
        str(out_dir / "plain"),
    ]
    code, _, err = _run(argv, capsys)
    assert code == 2
    _assert_one_error_line(err, "more than once")
    assert list(out_dir.iterdir()) == []


# --- the real command line, once --------------------------------------------------------


def _dicomflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicomflow", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_subprocess_round_trip_and_failures(
    tmp_path: Path, out_dir: Path, keys: dict[str, Path]
) -> None:
    plain = tmp_path / "in.dcm"
    plain.write_bytes(os.urandom(4096))
    sealed = tmp_path / "in.dcm.enc"
    restored = out_dir / "restored.dcm"

    done = _dicomflow("encrypt", "--master-key", f"1={keys['k1']}", str(plain), str(sealed))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    done = _dicomflow("decrypt", "--master-key", f"1={keys['k1']}", str(sealed), str(restored))
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert restored.read_bytes() == plain.read_bytes()
    restored.unlink()

    for kind, fragment in DECRYPT_FAILURES:
        bad = tmp_path / f"{kind}.enc"
        bad.write_bytes(_tampered(kind))
        done = _dicomflow("decrypt", "--master-key", f"1={keys['k1']}", str(bad), str(restored))
        assert done.returncode == 1, kind
        assert done.stdout == ""
        _assert_one_error_line(done.stderr, fragment)
        assert list(out_dir.iterdir()) == []

    done = _dicomflow("encrypt", "--master-key", f"1={keys['short']}", str(plain), str(restored))
    assert done.returncode == 2
    _assert_one_error_line(done.stderr, "decodes to 16 bytes")
    assert list(out_dir.iterdir()) == []
