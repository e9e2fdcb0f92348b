"""The arrival check reads an object's UIDs from its first bytes without copying the object:
it looks once 64 KiB have arrived, and keeps more only when the UIDs are not there yet."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import Dataset

from trolley_etl.core.arrival import (
    FIRST_LOOK_BYTES,
    CheckedSink,
    UnexpectedInstanceError,
)
from trolley_etl.core.model import StudyReference
from trolley_etl.core.storage import StorageDir
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


def _through_storage(tmp_path: Path, data: bytes, study_uid: str) -> StorageDir:
    storage = StorageDir(tmp_path / "out")
    sink = CheckedSink(storage, StudyReference(study_uid=study_uid))
    writer = sink.open_instance()
    for start in range(0, len(data), 8192):
        writer.write(data[start : start + 8192])
    writer.commit()
    return storage


def test_storage_reads_each_header_once_for_the_check_and_the_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = StorageDir.header_facts

    def counted(self: StorageDir, *args: object) -> object:
        calls.append(args)
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(StorageDir, "header_facts", counted)
    ds = make_dataset(study_uid="1.2.3")
    _through_storage(tmp_path, _part10(ds), "1.2.3")
    assert len(calls) == 1
    assert (tmp_path / "out" / "1.2.3" / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm").exists()


def test_storage_finds_uids_far_into_the_header_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    ds = make_dataset(study_uid="1.2.3")
    ds.add_new(0x00090010, "LO", "SOME VENDOR")
    ds.add_new(0x00091001, "OB", bytes(20 * FIRST_LOOK_BYTES))  # past every kept prefix
    data = _part10(ds)
    _through_storage(tmp_path, data, "1.2.3")
    assert len(list((tmp_path / "out").rglob("*.dcm"))) == 1
    with pytest.raises(UnexpectedInstanceError):
        _through_storage(tmp_path / "again", data, "1.2.4")
    assert not list((tmp_path / "again").rglob("*.dcm"))


def test_storage_refuses_bytes_that_are_not_dicom(tmp_path: Path) -> None:
    with pytest.raises(UnexpectedInstanceError):
        _through_storage(tmp_path, b"<html>not an image</html>" * 100, "1.2.3")
