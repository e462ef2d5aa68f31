"""Every patch dicomflow makes to a dependency's internals, each behind a version fence.

pynetdicom, nats-py and CPython are used here past their public API where that bought
speed, bounded memory or a clean exit. Each such patch is declared below with the
versions it was verified on and what dicomflow does without it; its code stays in the
module named, which installs it with one call (``Fence.install``). On any other version
the patch stays off, with one WARNING, and ``dicomflow_fastpath_active{patch}`` reports
0 in the metrics of every service that uses it (1 when active). pyproject.toml caps
pynetdicom and nats-py at the minor versions verified here;
``tests/unit/test_patches.py`` asserts every patch is active at the locked versions.
"""

from __future__ import annotations

from dicomflow.shared.patches.fence import CPYTHON, NATS_PY, PYNETDICOM, Fence, states

__all__ = [
    "ALL",
    "NATS_IO",
    "PROCESS_EXIT",
    "REACTORS",
    "SCP_PDATA",
    "SCP_PDU_LIMIT",
    "SCP_REUSE_PORT",
    "SCP_SPOOL",
    "SCP_TLS_SERVER",
    "SCU_PDATA",
    "SCU_RESPONSE",
    "Fence",
    "states",
]

_PYNETDICOM = ("3.0.4",)

# shared/patches/reactors.py: the DUL and association reactors woken by their work.
REACTORS = Fence(
    "reactors",
    PYNETDICOM,
    _PYNETDICOM,
    "both loops of every association poll as pynetdicom ships them (1 ms sleeps)",
)
# services/scu_gateway/pdata.py: C-STORE requests written straight to the socket.
SCU_PDATA = Fence(
    "scu_pdata",
    PYNETDICOM,
    _PYNETDICOM,
    "the scu-gateway sends every C-STORE with pynetdicom's send_c_store",
)
# services/scu_gateway/response.py: C-STORE-RSPs decoded without pydicom.
SCU_RESPONSE = Fence(
    "scu_response",
    PYNETDICOM,
    _PYNETDICOM,
    "the scu-gateway's C-STORE responses are decoded by pynetdicom",
)
# services/scp_gateway/pdata.py: C-STORE requests read, spooled and answered past the DUL.
SCP_PDATA = Fence(
    "scp_pdata",
    PYNETDICOM,
    _PYNETDICOM,
    "the gateway receives every C-STORE through pynetdicom's DUL thread, queues and "
    "state machine, a few KiB a read, and answers it through them",
)
# services/scp_gateway/service.py, ConnectionLimits: the size bound of every PDU read.
SCP_PDU_LIMIT = Fence(
    "scp_pdu_limit",
    PYNETDICOM,
    _PYNETDICOM,
    "the gateway's reads time out after scp.network_timeout but a PDU is read whatever "
    "length it announces (scp.maximum_pdu_size is not enforced on reads)",
)
# services/scp_gateway/service.py, start_servers: the TLS listener registered in AE._servers.
SCP_TLS_SERVER = Fence(
    "scp_tls_server",
    PYNETDICOM,
    _PYNETDICOM,
    "the DICOM TLS port is pynetdicom's own server: handshakes run in its accepting "
    "thread, and refused ones are neither logged nor counted",
)
# services/scp_gateway/service.py, start_servers: a listener made with SO_REUSEPORT (made
# by AE.make_server, registered in AE._servers as AE.start_server would).
SCP_REUSE_PORT = Fence(
    "scp_reuse_port",
    PYNETDICOM,
    _PYNETDICOM,
    "scp.reuse_port is ignored: one gateway process alone can listen on the DICOM port "
    "(with `up --replicas`, the others cannot start)",
)
# services/scp_gateway/spool.py: pynetdicom's dataset file factory, counted per association.
SCP_SPOOL = Fence(
    "scp_spool",
    PYNETDICOM,
    _PYNETDICOM,
    "datasets are measured against scp.max_dataset_bytes only once received whole, and "
    "files of aborted transfers are removed only when the gateway stops (after a crash: "
    "when the next one starts)",
)
# shared/patches/natsio.py: publishes framed with one copy, 1 MiB socket reads, payloads
# taken out of the parser's buffer with one copy.
NATS_IO = Fence(
    "nats_io",
    NATS_PY,
    ("2.16.0",),
    "nats-py frames each publish with its own copies of the payload, reads 32 KiB at once "
    "and copies each received payload twice out of its buffer",
)
# src/dicomflow/cli/process.py: CPython's shutdown steps, then os._exit.
PROCESS_EXIT = Fence(
    "process_exit",
    CPYTHON,
    ("3.11",),
    "dicomflow processes end through Python's own finalization, where obstore's threads "
    "can abort the process (SIGABRT) after its work is done",
)

ALL = (
    REACTORS,
    SCU_PDATA,
    SCU_RESPONSE,
    SCP_PDATA,
    SCP_PDU_LIMIT,
    SCP_TLS_SERVER,
    SCP_REUSE_PORT,
    SCP_SPOOL,
    NATS_IO,
    PROCESS_EXIT,
)
