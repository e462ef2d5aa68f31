"""Object names in the bucket, compatible with the Orthanc object-storage plugins.

``flat`` and ``legacy`` follow the plugins' rules exactly (``docs/encryption-format.md``) so
that either side can find the other's objects; ``hierarchical`` is dicomflow's own,
readable by humans. Names are deterministic in the SOP Instance UID, so a redelivered
message overwrites (or is detected as a duplicate of) the same object instead of
creating a second one.
"""

from __future__ import annotations

import re
import uuid
from enum import StrEnum

from dicomflow.shared.errors import ConfigError, ContractViolation


class Layout(StrEnum):
    FLAT = "flat"
    LEGACY = "legacy"
    HIERARCHICAL = "hierarchical"


# Fixed forever: changing it renames every object written under flat or legacy.
# (It is uuid5(NAMESPACE_URL, "urn:dicomflow:object-name"), kept as a literal so that no
# library change can move it.)
DICOMFLOW_NAMESPACE = uuid.UUID("cd98dc8d-a387-5448-8a81-b8b84df8d296")

_UID_MAX_LEN = 64
# Non-empty digit runs separated by single dots: no "..", no "/", no leading or trailing
# dot. [0-9], not \d, which also matches non-ASCII digits. Leading zeros in a component
# are against PS3.5 but common in the wild and harmless in a path, so they pass.
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def normalize_root_path(root: str) -> str:
    """``"my/root"`` and ``"my/root/"`` name the same root; ``""`` is the bucket root."""
    if root.startswith("/"):
        raise ConfigError(
            f"root path {root!r} starts with '/': object names are relative to the "
            "bucket, write it without the leading slash (e.g. 'my/root')"
        )
    return root.rstrip("/")


def object_uuid(sop_instance_uid: str) -> str:
    """A 36-character UUID string, the same for every delivery of one instance."""
    _check_uid("SOP Instance UID", sop_instance_uid)
    return str(uuid.uuid5(DICOMFLOW_NAMESPACE, sop_instance_uid))


def object_key(
    layout: Layout,
    root: str,
    *,
    sop_instance_uid: str,
    study_uid: str,
    series_uid: str,
    encrypted: bool,
) -> str:
    """The object name of one DICOM instance.

    All three UIDs are validated whatever the layout, so a message is accepted or
    refused the same way under every layout.
    """
    _check_uid("SOP Instance UID", sop_instance_uid)
    _check_uid("Study Instance UID", study_uid)
    _check_uid("Series Instance UID", series_uid)
    try:
        chosen = Layout(layout)
    except ValueError:
        raise ConfigError(
            f"unknown storage layout {layout!r}; choose one of {', '.join(m.value for m in Layout)}"
        ) from None
    enc = ".enc" if encrypted else ""
    match chosen:
        case Layout.FLAT:
            name = f"{object_uuid(sop_instance_uid)}.dcm{enc}"
        case Layout.LEGACY:
            # The plugins never add an extension or ".enc" under legacy.
            u = object_uuid(sop_instance_uid)
            name = f"{u[0:2]}/{u[2:4]}/{u}"
        case Layout.HIERARCHICAL:
            name = f"studies/{study_uid}/series/{series_uid}/{sop_instance_uid}.dcm{enc}"
    prefix = normalize_root_path(root)
    return f"{prefix}/{name}" if prefix else name


def _check_uid(what: str, value: str) -> None:
    # The value is not echoed: a malformed UID field may hold anything, patient data too.
    if not isinstance(value, str) or len(value) > _UID_MAX_LEN or not _UID.fullmatch(value):
        raise ContractViolation(
            f"{what} is not a DICOM UID (non-empty digit groups separated by dots, "
            f"at most {_UID_MAX_LEN} characters)"
        )
