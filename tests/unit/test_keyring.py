"""Master-key files, the key ring and ID=PATH specs."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from dicomflow.shared.crypto.keyring import (
    KeyRing,
    MasterKey,
    generate_master_key_file,
    load_master_key,
    parse_key_spec,
)
from dicomflow.shared.errors import ConfigError, KeyFileError, UnknownMasterKey

from support.keyfiles import write_secret

KEY = bytes(range(32))


def _key_file(tmp_path: Path, content: bytes, name: str = "k.b64") -> Path:
    path = tmp_path / name
    return write_secret(path, content)


# --- MasterKey ------------------------------------------------------------------------


def test_repr_and_str_hide_the_key() -> None:
    key = MasterKey(3, KEY)
    for text in (repr(key), str(key), f"{key}", repr([key]), repr(KeyRing(key))):
        assert KEY.hex() not in text
        assert repr(KEY) not in text
        assert base64.b64encode(KEY).decode() not in text
    assert "key_id=3" in repr(key)


@pytest.mark.parametrize("key_id", [-1, 2**32, True, "1"])
def test_key_id_must_be_uint32(key_id: object) -> None:
    with pytest.raises(ConfigError, match="uint32"):
        MasterKey(key_id, KEY)  # type: ignore[arg-type]


@pytest.mark.parametrize("key_id", [0, 2**32 - 1])
def test_key_id_bounds_accepted(key_id: int) -> None:
    assert MasterKey(key_id, KEY).key_id == key_id


@pytest.mark.parametrize("key", [b"", bytes(31), bytes(33)])
def test_key_must_be_32_bytes(key: bytes) -> None:
    with pytest.raises(ConfigError, match="exactly 32 bytes"):
        MasterKey(1, key)


def test_master_key_is_frozen() -> None:
    key = MasterKey(1, KEY)
    with pytest.raises(AttributeError):
        key.key_id = 2  # type: ignore[misc]


# --- load_master_key ------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        base64.b64encode(KEY),
        base64.b64encode(KEY) + b"\n",
        b"  \n\t" + base64.b64encode(KEY) + b"\r\n\n  ",
    ],
)
def test_load_ignores_surrounding_whitespace(tmp_path: Path, content: bytes) -> None:
    key = load_master_key(5, _key_file(tmp_path, content))
    assert key == MasterKey(5, KEY)


def test_load_refuses_16_byte_key(tmp_path: Path) -> None:
    path = _key_file(tmp_path, base64.b64encode(bytes(16)) + b"\n")
    with pytest.raises(KeyFileError) as info:
        load_master_key(1, path)
    message = str(info.value)
    assert f"master key file {path} decodes to 16 bytes" in message
    assert "exactly 32 bytes" in message
    assert "openssl rand -base64 32" in message


def test_load_refuses_64_byte_key(tmp_path: Path) -> None:
    path = _key_file(tmp_path, base64.b64encode(bytes(64)))
    with pytest.raises(KeyFileError, match="decodes to 64 bytes"):
        load_master_key(1, path)


@pytest.mark.parametrize(
    "content",
    [
        b"this is not base64!!",
        base64.b64encode(KEY)[:-1],  # bad padding
        base64.b64encode(KEY)[:20] + b" " + base64.b64encode(KEY)[20:],
        "ÿ".encode() * 22,
    ],
)
def test_load_refuses_non_base64(tmp_path: Path, content: bytes) -> None:
    path = _key_file(tmp_path, content)
    with pytest.raises(KeyFileError, match="not valid base64") as info:
        load_master_key(1, path)
    assert content.decode(errors="replace") not in str(info.value)


def test_load_refuses_empty_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="is empty"):
        load_master_key(1, _key_file(tmp_path, b"\n"))


def test_load_refuses_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.b64"
    with pytest.raises(KeyFileError, match="does not exist") as info:
        load_master_key(1, path)
    assert str(path) in str(info.value)


def test_load_refuses_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="is a directory"):
        load_master_key(1, tmp_path)


def test_key_file_error_is_a_config_error() -> None:
    assert issubclass(KeyFileError, ConfigError)


# --- KeyRing --------------------------------------------------------------------------


def test_ring_lookup_and_order() -> None:
    k1, k2, k3 = MasterKey(1, KEY), MasterKey(2, bytes(32)), MasterKey(3, b"\1" * 32)
    ring = KeyRing(k3, [k1, k2])
    assert ring.current is k3
    assert ring.key_ids == (3, 1, 2)
    assert ring.find(1) is k1
    assert ring.find(3) is k3
    with pytest.raises(UnknownMasterKey, match="unknown master key id 9"):
        ring.find(9)


def test_ring_without_previous_keys() -> None:
    ring = KeyRing(MasterKey(1, KEY))
    assert ring.key_ids == (1,)


@pytest.mark.parametrize("previous_ids", [[1], [2, 2]])
def test_ring_refuses_duplicate_ids(previous_ids: list[int]) -> None:
    with pytest.raises(ConfigError, match="more than once"):
        KeyRing(MasterKey(1, KEY), [MasterKey(i, bytes(32)) for i in previous_ids])


# --- generate_master_key_file ---------------------------------------------------------


def test_generate_writes_private_loadable_key(tmp_path: Path) -> None:
    path = tmp_path / "new.b64"
    old_umask = os.umask(0)  # the file must be 0o600 whatever the umask
    try:
        generate_master_key_file(path)
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o600
    content = path.read_bytes()
    assert content.endswith(b"\n")
    assert content.count(b"\n") == 1
    assert len(base64.b64decode(content.strip(), validate=True)) == 32
    assert load_master_key(1, path).key_id == 1


def test_generate_draws_fresh_keys(tmp_path: Path) -> None:
    generate_master_key_file(tmp_path / "a")
    generate_master_key_file(tmp_path / "b")
    assert (tmp_path / "a").read_bytes() != (tmp_path / "b").read_bytes()


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    path = _key_file(tmp_path, b"precious\n")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_master_key_file(path)
    assert path.read_bytes() == b"precious\n"


def test_generate_into_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot create"):
        generate_master_key_file(tmp_path / "nope" / "k.b64")


# --- parse_key_spec -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("1=/etc/k.b64", (1, Path("/etc/k.b64"))),
        ("0=k", (0, Path("k"))),
        ("4294967295=a=b", (4294967295, Path("a=b"))),
    ],
)
def test_parse_key_spec(spec: str, expected: tuple[int, Path]) -> None:
    assert parse_key_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["", "1", "/etc/k.b64", "=/etc/k", "1=", "x=/etc/k", "-1=/k", "1.5=/k", "²=/k"]
)
def test_parse_key_spec_malformed(spec: str) -> None:
    with pytest.raises(ConfigError, match="ID=PATH"):
        parse_key_spec(spec)


def test_parse_key_spec_out_of_range() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        parse_key_spec("4294967296=/k")
