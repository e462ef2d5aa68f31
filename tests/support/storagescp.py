"""A pynetdicom storage SCP on a free loopback port that answers every C-STORE with a
chosen status: a peer that takes (0x0000) or refuses (e.g. 0xC000) what it is sent."""

from __future__ import annotations

from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage  # type: ignore[attr-defined]

from support.servers import free_port

EXPLICIT_LE = "1.2.840.10008.1.2.1"


class Scp:
    def __init__(self, max_pdu: int, status: int = 0x0000, ae_title: str = "PEER") -> None:
        self.received: list[bytes] = []
        self.status = status
        self.port = free_port()
        self.ae = AE(ae_title=ae_title)
        self.ae.maximum_pdu_size = max_pdu
        self.ae.add_supported_context(SecondaryCaptureImageStorage, EXPLICIT_LE)
        self.server = self.ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def _on_store(self, event: Any) -> int:
        self.received.append(bytes(event.request.DataSet.getvalue()))
        return self.status

    def close(self) -> None:
        self.server.shutdown()
