"""Where `dicomflow up`, `edge` and `cloud` keep their state, and the config they write there."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomflow.shared.errors import ConfigError


@dataclass(frozen=True)
class StateDir:
    """What the state folder of `up`, `edge` and `cloud` holds alike."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "dicomflow.toml"

    @property
    def nats_store(self) -> Path:
        return self.root / "nats"

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


class DataDir(StateDir):
    """``dicomflow up --data-dir DIR`` (and, with its site bundle, ``edge``)."""

    @property
    def dev_key(self) -> Path:
        return self.keys / "master-1.key"

    @property
    def signing(self) -> Path:
        """The development signing key pair (``sealsign``): encryptor signs, store-writer checks."""
        return self.keys / "signing"

    @property
    def nats_security(self) -> Path:
        """The generated nats-server config, NKey seeds (0600) and TLS certificates."""
        return self.keys / "nats"

    @property
    def spool(self) -> Path:
        """The scp-gateway's private folder for datasets being received (it creates it 0700)."""
        return self.root / "spool"

    @property
    def lock(self) -> Path:
        """Held by the `up` that runs on this folder, with its PID (``datalock``)."""
        return self.root / "up.lock"

    def existing_config(self) -> Path:
        if not self.config.is_file():
            raise ConfigError(
                f"{self.config} not found: is {self.root} the --data-dir of `dicomflow up`?"
            )
        return self.config


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Render a two-level mapping (tables of scalars, lists and sub-tables) as TOML."""
    lines: list[str] = []
    for name, table in tables.items():
        _table(lines, name, table)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], name: str, table: dict[str, Any]) -> None:
    lines.append(f"[{name}]")
    nested = {k: v for k, v in table.items() if isinstance(v, dict)}
    for key, value in table.items():
        if key not in nested:
            lines.append(f"{key} = {_value(value)}")
    lines.append("")
    for key, value in nested.items():
        _table(lines, f"{name}.{key}", value)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):  # inside a list: an inline table (e.g. [[scu.rules]])
        return "{" + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")
