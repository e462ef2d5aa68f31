"""A destination that rejects the association is a permanent refusal, however quickly
it rejects and closes.

Orthanc rejects a called AE title it does not know and closes the connection at once.
pynetdicom 3.0's requestor checks that the transport is still up before it reads the
answer; when the rejection and the close come first it aborts instead, and reports an
abort (a transient failure, retried) with the A-ASSOCIATE-RJ left unread. On loopback
that happens 4 to 7 times in 100; here the requestor is held just before that
check so that it happens every time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dicomflow.scu_gateway.association import AssociationPool
from dicomflow.scu_gateway.settings import DestinationSettings
from dicomflow.scu_gateway.status import DeliveryRefused
from dicomflow.shared.telemetry.metrics import Metrics
from pynetdicom import evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from support.dicomfiles import with_pixel_bytes
from support.orthanc import Orthanc

EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with Orthanc(tmp_path_factory.mktemp("orthanc"), ae_title="ORTHANC_B") as server:
        yield server


def held_before_the_answer(pool: AssociationPool, seconds: float) -> list[bool]:
    """Hold each association's requestor once its request is queued, until the peer has
    answered and closed; return, per association, whether pynetdicom saw the rejection."""
    associate = pool._ae.associate
    seen: list[bool] = []

    def hold(event: Any) -> None:
        time.sleep(seconds)

    def associate_held(*args: Any, **kwargs: Any) -> Any:
        assoc = associate(*args, evt_handlers=[(evt.EVT_REQUESTED, hold)], **kwargs)
        seen.append(bool(assoc.is_rejected))
        return assoc

    pool._ae.associate = associate_held  # type: ignore[method-assign]
    return seen


@pytest.mark.parametrize("held", [0.0, 0.5], ids=["as-it-comes", "answer-first"])
def test_rejection_is_a_permanent_refusal(orthanc: Orthanc, tmp_path: Path, held: float) -> None:
    made = with_pixel_bytes(tmp_path / "a.dcm", 1000)
    dest = DestinationSettings(ae_title="NOT_ORTHANC", host="127.0.0.1", port=orthanc.dicom_port)
    metrics = Metrics("scu-gateway")
    pool = AssociationPool("PACS", dest, "DICOMFLOW", metrics)
    seen = held_before_the_answer(pool, held)
    pair = (str(SecondaryCaptureImageStorage), EXPLICIT_LE)
    for _ in range(3):
        with pytest.raises(DeliveryRefused, match="Rejected Permanent") as refused:
            pool.store(made.path, pair)
        assert "Called AE title not recognised" in str(refused.value)
    if held:
        assert seen == [False] * 3  # pynetdicom itself reported an abort every time
    assert associations(metrics, "rejected") == 3
    assert associations(metrics, "failed") == 0
    assert orthanc.instances() == {}


def associations(metrics: Metrics, result: str) -> float:
    labels = {"destination": "PACS", "result": result}
    value = metrics.registry.get_sample_value("dicomflow_scu_associations_total", labels)
    return value or 0.0
