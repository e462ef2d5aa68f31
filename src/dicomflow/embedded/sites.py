"""Where `dicomflow cloud` and `dicomflow edge` keep their state, and the site bundle the
cloud makes for each site (carried by the operator to the hospital).

Site bundle (``cloud add-site NAME --out DIR``), every secret 0600:

- ``site.json``: the site's name and the cloud's leafnode URLs;
- ``leaf.nk``: the NKey seed of the site's leaf user on the cloud (secret);
- ``leaf.pem``/``leaf-key.pem``: the leaf's client certificate, signed by the cloud's CA;
- ``cloud-ca.pem``: the CA the cloud's leafnode certificate chains to;
- ``signing.pem``/``signing.pub.pem``: the site encryptor's signing key pair; the cloud
  keeps only the public half, among the store-writer's trusted keys.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from dicomflow.cli.natsconfig import Bundle
from dicomflow.embedded.layout import DataDir, StateDir
from dicomflow.shared.crypto.sealsign import PRIVATE_NAME, PUBLIC_NAME
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.nats import zones
from dicomflow.shared.nats.natscerts import write_private

SECRET_FILES = ("leaf.nk", "leaf-key.pem", PRIVATE_NAME)
PUBLIC_FILES = ("site.json", "leaf.pem", "cloud-ca.pem", PUBLIC_NAME)


@dataclass(frozen=True)
class SiteBundle:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "site.json"

    @property
    def seed(self) -> Path:
        return self.root / "leaf.nk"

    @property
    def cert(self) -> Path:
        return self.root / "leaf.pem"

    @property
    def key(self) -> Path:
        return self.root / "leaf-key.pem"

    @property
    def ca(self) -> Path:
        return self.root / "cloud-ca.pem"

    @property
    def signing_key(self) -> Path:
        return self.root / PRIVATE_NAME

    @property
    def signing_public(self) -> Path:
        return self.root / PUBLIC_NAME

    def read(self) -> tuple[str, list[str]]:
        """The site's name and the cloud's leafnode URLs; ConfigError if incomplete."""
        missing = [n for n in (*SECRET_FILES, *PUBLIC_FILES) if not (self.root / n).is_file()]
        if missing:
            raise ConfigError(
                f"{self.root} is not a site bundle of `dicomflow cloud add-site` "
                f"(missing {', '.join(missing)})"
            )
        try:
            manifest = json.loads(self.manifest.read_text())
            site, urls = str(manifest["site"]), [str(u) for u in manifest["cloud_urls"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{self.manifest} is malformed ({type(exc).__name__})") from exc
        return zones.check_site(site), urls

    def write_manifest(self, site: str, cloud_urls: list[str]) -> None:
        self.manifest.write_text(json.dumps({"site": site, "cloud_urls": cloud_urls}) + "\n")

    def copy_to(self, target: Path) -> SiteBundle:
        """Install this bundle at ``target`` (an edge's data folder), secrets 0600."""
        target.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in SECRET_FILES:
            write_private(target / name, (self.root / name).read_bytes())
        for name in PUBLIC_FILES:
            shutil.copyfile(self.root / name, target / name)
        return SiteBundle(target)


class CloudDir(StateDir):
    """``dicomflow cloud --data-dir DIR``."""

    @property
    def nats(self) -> Bundle:
        """Seeds of the cloud's users, its CA, leafnode certificate and server config."""
        return Bundle(self.keys / "nats")

    @property
    def trusted(self) -> Path:
        """The public signing keys of the sites' encryptors (``<site>.pub.pem``)."""
        return self.keys / "trusted"

    @property
    def sites(self) -> Path:
        """``<site>.json``: each site's leaf public NKey."""
        return self.root / "sites"

    def registered(self) -> dict[str, str]:
        """``{site: leaf public NKey}`` of every site added."""
        found: dict[str, str] = {}
        for path in sorted(self.sites.glob("*.json")) if self.sites.is_dir() else []:
            found[path.stem] = str(json.loads(path.read_text())["leaf_public_key"])
        return found


class EdgeDir(DataDir):
    """``dicomflow edge --data-dir DIR``: an `up` data folder plus the site's bundle."""

    @property
    def site(self) -> SiteBundle:
        return SiteBundle(self.keys / "site")
