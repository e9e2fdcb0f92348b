"""The arrival check reads the UIDs of DICOM JSON objects (metadata-only pulls) too."""

from __future__ import annotations

import json

import pytest

from trolley_etl.core.arrival import UnexpectedInstanceError, read_uids

UIDS = {"0020000D": "1.2.3", "0020000E": "1.2.3.4", "00080018": "1.2.3.4.5"}


def _json(uids: dict[str, str], padding: int = 0) -> bytes:
    item: dict = {tag: {"vr": "UI", "Value": [uid]} for tag, uid in uids.items()}
    item["00321060"] = {"vr": "LO", "Value": ["x" * padding]}  # after the UIDs
    return json.dumps(dict(sorted(item.items()))).encode()


def test_uids_of_a_whole_json_object() -> None:
    assert read_uids(_json(UIDS), complete=True) == {
        "StudyInstanceUID": "1.2.3",
        "SeriesInstanceUID": "1.2.3.4",
        "SOPInstanceUID": "1.2.3.4.5",
    }


def test_uids_of_a_json_object_longer_than_the_kept_prefix() -> None:
    data = _json(UIDS, padding=5000)
    assert read_uids(data[:2000], complete=False)["SOPInstanceUID"] == "1.2.3.4.5"


@pytest.mark.parametrize("broken", [b"{not json", b"[]", _json({"0020000D": "1.2.3"})])
def test_json_without_readable_uids_is_refused(broken: bytes) -> None:
    with pytest.raises(UnexpectedInstanceError):
        read_uids(broken, complete=True)
