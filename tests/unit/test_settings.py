"""Settings: environment over config file, and clear errors naming the bad field."""

from __future__ import annotations

from pathlib import Path

import pytest
from dicomflow.encryptor.settings import EncryptorSettings
from dicomflow.scp_gateway.settings import ScpGatewaySettings
from dicomflow.shared.crypto.keyload import load_keyring
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.settings import load_settings
from dicomflow.store_writer.settings import StoreWriterSettings

from support.keyfiles import write_secret


def test_config_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[scp]\nae_title = "FROMFILE"\nport = 104\n'
        'allowed_calling_aes = ["CT01"]\n[nats]\nservers = ["nats://a:1"]\n'
    )
    monkeypatch.setenv("DICOMFLOW_SCP__PORT", "2104")
    settings = load_settings(ScpGatewaySettings, config)
    assert settings.scp.ae_title == "FROMFILE"
    assert settings.scp.port == 2104
    assert settings.scp.allowed_calling_aes == ["CT01"]
    assert settings.nats.servers == ["nats://a:1"]


@pytest.mark.parametrize(
    ("toml", "field"),
    [
        ('[storage]\nlayout = "spiral"\n', "storage.layout"),
        ('[storage]\nroot_path = "/abs"\n', "storage.root_path"),
        ("[consumer]\nmax_deliver = 1\n", "consumer.max_deliver"),
        ('[scp]\nae_title = "WAY_TOO_LONG_AE_TITLE"\n', "scp.ae_title"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, toml: str, field: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    cls = ScpGatewaySettings if "scp" in field else StoreWriterSettings
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_settings(cls, config)


def test_missing_or_malformed_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(ScpGatewaySettings, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[scp\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_settings(ScpGatewaySettings, bad)


def test_encryptor_refuses_to_start_without_a_usable_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="master_key is not set"):
        load_keyring(load_settings(EncryptorSettings).encryption)
    short = tmp_path / "short.key"
    write_secret(short, "c2hvcnQ=\n")  # 5 bytes
    config = tmp_path / "c.toml"
    config.write_text(f'[encryption.master_key]\nid = 1\npath = "{short}"\n')
    with pytest.raises(ConfigError, match="32 bytes"):
        load_keyring(load_settings(EncryptorSettings, config).encryption)
