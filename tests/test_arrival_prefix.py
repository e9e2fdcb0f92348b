"""The arrival check reads an object's UIDs from its first bytes without copying the object:
it looks once 64 KiB have arrived, and keeps more only when the UIDs are not there yet."""

from __future__ import annotations

import io

import pytest
from pydicom import Dataset

from trolley_etl.core.arrival import (
    FIRST_LOOK_BYTES,
    CheckedSink,
    UnexpectedInstanceError,
)
from trolley_etl.core.model import StudyReference
from trolley_etl.testing import make_dataset


class _Kept:
    """An inner sink keeping what it was given, in memory."""

    def __init__(self) -> None:
        self.committed: list[bytes] = []
        self.aborted = 0

    def open_instance(self) -> _KeptWriter:
        return _KeptWriter(self)


class _KeptWriter:
    def __init__(self, sink: _Kept) -> None:
        self.sink = sink
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def commit(self) -> None:
        self.sink.committed.append(bytes(self.data))

    def abort(self) -> None:
        self.sink.aborted += 1


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _send(data: bytes, study_uid: str, chunk: int) -> _Kept:
    kept = _Kept()
    sink = CheckedSink(kept, StudyReference(study_uid=study_uid))
    writer = sink.open_instance()
    for start in range(0, len(data), chunk):
        writer.write(data[start : start + chunk])
    writer.commit()
    return kept


@pytest.mark.parametrize("chunk", [1000, 70_000, 1 << 20])
def test_an_object_with_its_uids_early_is_accepted_whole(chunk: int) -> None:
    ds = make_dataset(study_uid="1.2.3")
    ds.PixelData = bytes(300_000)  # far larger than the first look
    ds.Rows, ds.Columns, ds.BitsAllocated = 300, 500, 16
    data = _part10(ds)
    kept = _send(data, "1.2.3", chunk)
    assert kept.committed == [data]


def test_uids_after_a_large_private_element_are_found_on_the_second_look() -> None:
    ds = make_dataset(study_uid="1.2.3")
    ds.add_new(0x00090010, "LO", "SOME VENDOR")
    ds.add_new(0x00091001, "OB", bytes(3 * FIRST_LOOK_BYTES))  # before group 0020
    data = _part10(ds)
    assert data.index(b"1.2.3") > FIRST_LOOK_BYTES
    assert _send(data, "1.2.3", 8192).committed == [data]
    with pytest.raises(UnexpectedInstanceError):  # and a wrong study there is still refused
        _send(data, "1.2.4", 8192)
