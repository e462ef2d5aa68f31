"""No SOP Instance UID in a stage's logs or a dead-letter reason (real stages).

The store writer is made to fail on one instance's object path (a folder stands where
its file must go): obstore's error quotes the whole path, which holds the UID. The
failure is logged at every retry and ends in the dead-letter stream; neither may name
the instance, and both carry its reference instead.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dicomflow.shared.stage.consumer import H_DLQ_REASON
from dicomflow.shared.storage.layout import Layout, object_key
from dicomflow.shared.telemetry.redact import redact, uid_ref

from dicomflow.embedded.natsserver import NatsServer
from support.dicomfiles import ct_series
from support.pipeline import Pipeline

pytestmark = pytest.mark.integration


def test_a_storage_error_quoting_the_object_path_is_logged_and_dead_lettered_without_the_uid(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    objects = tmp_path / "objects"
    pipe = Pipeline(
        tmp_path / "pipe",
        nats_server,
        {"backend": "local", "local_path": objects, "layout": "hierarchical"},
        extra={"consumer": {"max_deliver": 2, "outage_grace": 0.5}},
    )
    (made,) = ct_series(tmp_path / "in", 1)
    key = object_key(
        Layout.HIERARCHICAL,  # studies/<study UID>/series/<series UID>/<SOP UID>.dcm.enc
        "",
        sop_instance_uid=made.sop_instance_uid,
        study_uid=made.study_uid,
        series_uid=made.series_uid,
        encrypted=True,
    )
    (objects / key / "in-the-way").mkdir(parents=True)  # a folder where the object goes
    pipe.start()
    try:
        assert pipe.send([made]).statuses() == ["Success"]
        letters = _wait_for_letters(pipe)
        reason = letters[0][H_DLQ_REASON]
        # (obstore's texts differ by where the write failed, and a reason is cut at 1000
        # characters: the path may or may not be in it, but never with the UID)
        assert made.sop_instance_uid not in reason
        assert made.study_uid not in reason
        logs = "".join(pipe.logs(stage) for stage in pipe.names)
        assert uid_ref(made.sop_instance_uid) in logs
        assert made.sop_instance_uid not in logs
        assert made.study_uid not in logs
    finally:
        pipe.stop()


def _wait_for_letters(pipe: Pipeline) -> list[dict[str, str]]:
    deadline = time.monotonic() + 90
    while not (letters := pipe.dead_letters()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert letters, pipe.logs("store-writer")[-3000:]
    return letters


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ("transfer syntax 1.2.840.10008.1.2.4.50 refused", True),  # a standard UID
        ("peer 127.0.0.1:11112 refused", True),  # an IPv4 address
        ("version 2.10.4", True),
    ],
)
def test_standard_uids_and_addresses_are_kept(text: str, kept: bool) -> None:
    assert (redact(text) == text) is kept


def test_an_instance_uid_in_a_path_is_replaced_by_its_reference() -> None:
    uid = "1.2.826.0.1.3680043.8.498.12345678901234567890"
    text = f"Generic LocalFileSystem error: /data/objects/{uid}.dcm.enc: Is a directory"
    assert redact(text) == (
        f"Generic LocalFileSystem error: /data/objects/{uid_ref(uid)}.dcm.enc: Is a directory"
    )
