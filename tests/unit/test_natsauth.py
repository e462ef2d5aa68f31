"""The generated NATS users and permissions, credentials and TLS settings (no server)."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from dicomflow.shared.contracts import subjects
from dicomflow.shared.errors import ConfigError
from dicomflow.shared.nats import natsauth, natsconn
from dicomflow.shared.settings import NatsSettings, ServiceSettings, load_settings

from dicomflow.cli.natsconfig import Bundle, new_seed, write_bundle
from support.keyfiles import write_secret

INGEST_BLOBS = f"OBJ_{subjects.INGEST_BLOB_BUCKET}"
SEALED_BLOBS = f"OBJ_{subjects.SEALED_BLOB_BUCKET}"


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more trailing tokens."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, part in enumerate(pat):
        if part == ">":
            return len(sub) > i
        if i >= len(sub) or part not in ("*", sub[i]):
            return False
    return len(pat) == len(sub)


def _may_publish(user: str, subject: str) -> bool:
    perms = natsauth.permissions(user, "UKEY")
    return any(_matches(p, subject) for p in perms.publish) and not any(
        _matches(p, subject) for p in perms.publish_deny
    )


def _may_subscribe(user: str, subject: str) -> bool:
    return any(_matches(p, subject) for p in natsauth.permissions(user, "UKEY").subscribe)


def test_matcher_follows_nats_wildcards() -> None:
    assert _matches("a.*.c", "a.b.c") and not _matches("a.*.c", "a.b.d.c")
    assert _matches("a.>", "a.b.c") and not _matches("a.>", "a")


@pytest.mark.parametrize("user", natsauth.SERVICE_USERS)
@pytest.mark.parametrize("verb", ["CREATE", "UPDATE", "DELETE", "PURGE"])
@pytest.mark.parametrize("stream", [subjects.INGEST_STREAM, subjects.SEALED_STREAM, "ANY"])
def test_only_admin_manages_streams(user: str, verb: str, stream: str) -> None:
    # The one exception: a stage may purge its own work queue (below its ack floor).
    # SEALED has interest retention (the relay reads it too): nobody purges it.
    own_queue = (user, stream) == ("encryptor", subjects.INGEST_STREAM)
    assert _may_publish(user, f"$JS.API.STREAM.{verb}.{stream}") == (verb == "PURGE" and own_queue)
    assert _may_publish("admin", f"$JS.API.STREAM.{verb}.{stream}")


def test_only_the_scu_gateway_purges_delivery() -> None:
    subject = f"$JS.API.STREAM.PURGE.{subjects.DELIVERY_STREAM}"
    assert [u for u in natsauth.SERVICE_USERS if _may_publish(u, subject)] == ["scu-gateway"]


def test_scu_gateway_reads_sealed_only_through_its_relay_durable() -> None:
    user, sealed = "scu-gateway", subjects.SEALED_STREAM
    assert _may_publish(user, f"$JS.API.CONSUMER.MSG.NEXT.{sealed}.scu-relay")
    assert _may_publish(user, f"$JS.API.CONSUMER.DELETE.{sealed}.scu-relay")
    for subject in (
        f"$JS.API.CONSUMER.MSG.NEXT.{sealed}.store-writer",
        f"$JS.API.CONSUMER.DELETE.{sealed}.store-writer",
        f"$JS.API.CONSUMER.MSG.NEXT.{subjects.INGEST_STREAM}.scu-relay",
        f"$JS.API.STREAM.MSG.GET.{INGEST_BLOBS}",
        f"$JS.API.STREAM.PURGE.{sealed}",
    ):
        assert not _may_publish(user, subject), subject


def test_store_writer_cannot_read_plaintext() -> None:
    user = "store-writer"
    ingest = subjects.INGEST_STREAM
    refused = [
        f"$JS.API.CONSUMER.MSG.NEXT.{ingest}.encryptor",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{ingest}.peek",
        f"$JS.API.CONSUMER.CREATE.{ingest}",
        f"$JS.API.CONSUMER.CREATE.{ingest}.peek.{subjects.INGEST_PREFIX}.>",
        f"$JS.API.STREAM.MSG.GET.{ingest}",
        f"$JS.API.DIRECT.GET.{ingest}",
        f"$JS.API.STREAM.MSG.GET.{INGEST_BLOBS}",
        f"$JS.API.DIRECT.GET.{INGEST_BLOBS}",
        f"$JS.API.DIRECT.GET.{INGEST_BLOBS}.$O.{subjects.INGEST_BLOB_BUCKET}.C.x",
        f"$JS.API.STREAM.MSG.GET.{subjects.DLQ_STREAM}",  # holds dead-lettered plaintext
        f"$JS.API.CONSUMER.CREATE.{subjects.DLQ_STREAM}",
    ]
    for subject in refused:
        assert not _may_publish(user, subject), subject
    for subject in (f"{subjects.INGEST_PREFIX}.A.B", "_INBOX.UOTHER.x", "_INBOX.>"):
        assert not _may_subscribe(user, subject), subject
    allowed = [
        f"$JS.API.CONSUMER.MSG.NEXT.{subjects.SEALED_STREAM}.store-writer",
        f"$JS.ACK.{subjects.SEALED_STREAM}.store-writer.1.2.3.4.5",
        f"$JS.API.DIRECT.GET.{SEALED_BLOBS}",
        subjects.stored_subject("DICOMFLOW", "CT01"),
        f"$KV.{subjects.INDEX_BUCKET}.1.2.3",
        subjects.dlq_subject("store-writer"),
    ]
    for subject in allowed:
        assert _may_publish(user, subject), subject


def test_gateway_only_publishes_ingest() -> None:
    user = "scp-gateway"
    assert _may_publish(user, subjects.ingest_subject("DICOMFLOW", "CT 01"))
    assert _may_publish(user, f"$O.{subjects.INGEST_BLOB_BUCKET}.C.nuid")
    for subject in (
        subjects.sealed_subject("DICOMFLOW", "CT01"),
        subjects.stored_subject("DICOMFLOW", "CT01"),
        f"$O.{subjects.SEALED_BLOB_BUCKET}.C.nuid",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{subjects.SEALED_STREAM}.x",
        f"$JS.API.CONSUMER.MSG.NEXT.{subjects.INGEST_STREAM}.encryptor",
        f"$JS.API.STREAM.MSG.GET.{subjects.INGEST_STREAM}",
        f"$KV.{subjects.INDEX_BUCKET}.1.2.3",
    ):
        assert not _may_publish(user, subject), subject
    assert not _may_subscribe(user, f"{subjects.SEALED_PREFIX}.>")


def test_encryptor_reads_ingest_and_writes_sealed_only() -> None:
    user = "encryptor"
    assert _may_publish(user, f"$JS.API.CONSUMER.MSG.NEXT.{subjects.INGEST_STREAM}.encryptor")
    assert _may_publish(user, subjects.sealed_subject("A", "B"))
    assert _may_publish(user, f"$JS.API.DIRECT.GET.{INGEST_BLOBS}")
    assert not _may_publish(user, subjects.ingest_subject("A", "B"))  # cannot forge input
    assert not _may_publish(user, subjects.stored_subject("A", "B"))
    assert not _may_publish(user, f"$JS.API.CONSUMER.MSG.NEXT.{subjects.SEALED_STREAM}.x")


def test_scu_gateway_cannot_forge_other_stages_dead_letters() -> None:
    assert _may_publish("scu-gateway", subjects.dlq_subject("deliver-PACS"))
    assert _may_publish("scu-gateway", subjects.dlq_subject("scu-router"))
    for stage in ("encryptor", "store-writer", "scp-gateway", "anything", "deliver-A.B"):
        assert not _may_publish("scu-gateway", subjects.dlq_subject(stage))
    for user in ("scp-gateway", "encryptor", "store-writer"):
        assert not _may_publish(user, subjects.dlq_subject("deliver-PACS"))
        assert not _may_publish(user, subjects.dlq_subject("scu-router"))
    assert not _may_publish("scu-gateway", f"$JS.API.CONSUMER.MSG.NEXT.{subjects.SEALED_STREAM}.x")


def test_each_user_has_a_private_inbox() -> None:
    for user in natsauth.SERVICE_USERS:
        perms = natsauth.permissions(user, "UMINE")
        assert perms.subscribe == ("_INBOX.UMINE.>",)


def test_bundle_holds_public_keys_only_in_config_and_private_seeds(tmp_path: Path) -> None:
    bundle = Bundle(tmp_path / "out")
    keys = write_bundle(bundle, tls=True, max_payload=8 * 1024 * 1024)
    config = bundle.server_config.read_text()
    assert "max_payload: 8388608" in config and "verify: false" in config
    for user in natsauth.USERS:
        seed = bundle.seed(user).read_text().strip()
        assert seed.startswith("SU") and seed not in config
        assert keys[user] in config and natsconn.public_key(seed) == keys[user]
        assert stat.S_IMODE(bundle.seed(user).stat().st_mode) == 0o600
    assert stat.S_IMODE(bundle.key("server").stat().st_mode) == 0o600
    assert stat.S_IMODE(bundle.key("ca").stat().st_mode) == 0o600
    secrets = (bundle.k8s / "nats-credentials.yaml").read_text()
    assert secrets.count('"kind": "Secret"') == len(natsauth.USERS)

    with pytest.raises(ConfigError, match="--force"):
        write_bundle(bundle)
    assert write_bundle(bundle, reuse=True) == keys  # up: same users after a restart
    assert write_bundle(bundle, force=True) != keys


def test_mtls_bundle_requires_client_certificates(tmp_path: Path) -> None:
    bundle = Bundle(tmp_path / "out")
    write_bundle(bundle, mtls=True)
    assert "verify: true" in bundle.server_config.read_text()
    assert "handshake_first: true" in bundle.server_config.read_text()
    for user in natsauth.USERS:
        assert bundle.cert(user).is_file() and bundle.key(user).is_file()


def test_tls_context_verifies_and_refuses_old_versions(tmp_path: Path) -> None:
    bundle = Bundle(tmp_path / "out")
    write_bundle(bundle, mtls=True)
    settings = NatsSettings(
        tls={
            "enabled": True,
            "ca_file": bundle.ca,
            "cert_file": bundle.cert("admin"),
            "key_file": bundle.key("admin"),
        }
    )
    context = natsconn.tls_context(settings)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    options = natsconn.security_options(settings)
    assert options["tls"] is not None and options["tls_handshake_first"] is True


def test_tls_is_implied_by_a_tls_url() -> None:
    options = natsconn.security_options(NatsSettings(servers=["tls://nats.example:4222"]))
    assert isinstance(options["tls"], ssl.SSLContext)
    assert "tls" not in natsconn.security_options(NatsSettings())


@pytest.mark.parametrize("field", ["ca_file", "cert_file", "key_file"])
def test_unreadable_tls_files_name_the_setting(tmp_path: Path, field: str) -> None:
    bundle = Bundle(tmp_path / "out")
    write_bundle(bundle, mtls=True)
    files = {
        "ca_file": bundle.ca,
        "cert_file": bundle.cert("admin"),
        "key_file": bundle.key("admin"),
    }
    files[field] = tmp_path / "missing.pem"
    settings = NatsSettings(tls={"enabled": True, **files})
    with pytest.raises(ConfigError, match=rf"nats\.tls\.{field}"):
        natsconn.security_options(settings)


def test_unusable_seed_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nats\.nkey_seed_file"):
        natsconn.security_options(NatsSettings(nkey_seed_file=tmp_path / "none.nk"))
    bad = tmp_path / "bad.nk"
    write_secret(bad, "not a seed\n")
    with pytest.raises(ConfigError, match=r"nats\.nkey_seed_file"):
        natsconn.security_options(NatsSettings(nkey_seed_file=bad))
    good = tmp_path / "good.nk"
    seed = new_seed()
    write_secret(good, seed + "\n")
    options = natsconn.security_options(NatsSettings(nkey_seed_file=good))
    assert options["inbox_prefix"] == f"_INBOX.{natsconn.public_key(seed)}"


def test_certificate_without_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMFLOW_NATS__TLS__CERT_FILE", "/etc/client.pem")
    with pytest.raises(ConfigError, match="key_file"):
        load_settings(ServiceSettings)
