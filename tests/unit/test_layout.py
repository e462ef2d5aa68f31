"""Object names: flat and legacy as the Orthanc plugins write them, and hierarchical."""

from __future__ import annotations

import re
import uuid

import pytest
from dicomflow.shared.errors import ConfigError, ContractViolation
from dicomflow.shared.storage.layout import (
    DICOMFLOW_NAMESPACE,
    Layout,
    normalize_root_path,
    object_key,
    object_uuid,
)

SOP = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
STUDY = "1.2.840.113619.2.55.3.604688119.969.1268071029.1"
SERIES = "1.2.840.113619.2.55.3.604688119.969.1268071029.2"
U = str(uuid.uuid5(DICOMFLOW_NAMESPACE, SOP))
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _key(layout: Layout, root: str, *, encrypted: bool) -> str:
    return object_key(
        layout,
        root,
        sop_instance_uid=SOP,
        study_uid=STUDY,
        series_uid=SERIES,
        encrypted=encrypted,
    )


@pytest.mark.parametrize(
    ("root", "expected"),
    [("", ""), ("my/root", "my/root"), ("my/root/", "my/root"), ("a", "a"), ("a//", "a")],
)
def test_normalize_root_path(root: str, expected: str) -> None:
    assert normalize_root_path(root) == expected


@pytest.mark.parametrize("root", ["/", "/abs", "/my/root/"])
def test_absolute_root_refused(root: str) -> None:
    with pytest.raises(ConfigError, match="starts with '/'"):
        normalize_root_path(root)
    with pytest.raises(ConfigError):
        _key(Layout.FLAT, root, encrypted=False)


def test_object_uuid_is_deterministic_and_36_chars() -> None:
    first = object_uuid(SOP)
    assert first == object_uuid(SOP) == U
    assert len(first) == 36
    assert UUID_RE.fullmatch(first)
    assert object_uuid(SOP + "1") != first


def test_namespace_is_pinned() -> None:
    # Changing it would rename every flat/legacy object ever written.
    assert str(DICOMFLOW_NAMESPACE) == "cd98dc8d-a387-5448-8a81-b8b84df8d296"
    assert object_uuid("1.2.3") == str(uuid.uuid5(DICOMFLOW_NAMESPACE, "1.2.3"))


@pytest.mark.parametrize(
    ("layout", "encrypted", "name"),
    [
        (Layout.FLAT, False, f"{U}.dcm"),
        (Layout.FLAT, True, f"{U}.dcm.enc"),
        (Layout.LEGACY, False, f"{U[0:2]}/{U[2:4]}/{U}"),
        (Layout.LEGACY, True, f"{U[0:2]}/{U[2:4]}/{U}"),
        (Layout.HIERARCHICAL, False, f"studies/{STUDY}/series/{SERIES}/{SOP}.dcm"),
        (Layout.HIERARCHICAL, True, f"studies/{STUDY}/series/{SERIES}/{SOP}.dcm.enc"),
    ],
)
@pytest.mark.parametrize(
    ("root", "prefix"), [("", ""), ("my/root", "my/root/"), ("my/root/", "my/root/")]
)
def test_object_key(layout: Layout, encrypted: bool, name: str, root: str, prefix: str) -> None:
    key = _key(layout, root, encrypted=encrypted)
    assert key == prefix + name
    assert not key.startswith("/")
    assert key == _key(layout, root, encrypted=encrypted)


def test_layout_values() -> None:
    assert [m.value for m in Layout] == ["flat", "legacy", "hierarchical"]
    assert Layout("flat") is Layout.FLAT


def test_layout_given_as_plain_string() -> None:
    assert _key("flat", "", encrypted=True) == f"{U}.dcm.enc"  # type: ignore[arg-type]


def test_unknown_layout() -> None:
    with pytest.raises(ConfigError, match="unknown storage layout"):
        _key("nested", "", encrypted=False)  # type: ignore[arg-type]


BAD_UIDS = [
    "",
    ".",
    "..",
    "../etc",
    "1.2/3",
    "1..2",
    ".1.2",
    "1.2.",
    "1.2.3\n",
    "1.2.a",
    " 1.2",
    "1.2\x00",
    "\u0661.\u0662",  # Arabic-Indic digits: digits to str.isdigit and \d, not to DICOM
    "1." * 32 + "1",  # 65 characters
]


@pytest.mark.parametrize("bad", BAD_UIDS)
@pytest.mark.parametrize("field", ["sop_instance_uid", "study_uid", "series_uid"])
@pytest.mark.parametrize("layout", list(Layout))
def test_bad_uids_refused(bad: str, field: str, layout: Layout) -> None:
    uids = {"sop_instance_uid": SOP, "study_uid": STUDY, "series_uid": SERIES, field: bad}
    with pytest.raises(ContractViolation, match="not a DICOM UID") as info:
        object_key(layout, "root", encrypted=True, **uids)
    if len(bad) > 3:  # short ones ("." ...) occur in any sentence
        assert bad not in str(info.value)


@pytest.mark.parametrize("bad", BAD_UIDS)
def test_object_uuid_refuses_bad_uid(bad: str) -> None:
    with pytest.raises(ContractViolation):
        object_uuid(bad)


@pytest.mark.parametrize("good", ["1", "0.0", "1.2.840.10008.1.2.1", "1." * 31 + "12"])
def test_good_uids_accepted(good: str) -> None:
    assert len(good) <= 64
    name = object_key(
        Layout.HIERARCHICAL,
        "",
        sop_instance_uid=good,
        study_uid=good,
        series_uid=good,
        encrypted=False,
    )
    assert name == f"studies/{good}/series/{good}/{good}.dcm"
