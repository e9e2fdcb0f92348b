"""Storage: layout templates, path sanitisation, atomic writes."""

import hashlib
import os
from pathlib import Path

import pydicom
import pytest

from trolley_etl import StorageDir
from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl.core.backend import write_instance
from trolley_etl.core.errors import LayoutError, StorageError
from trolley_etl.core.storage import (
    MAX_COMPONENT_LENGTH,
    MISSING_VALUE,
    LayoutTemplate,
    sanitise_component,
)


def _instance(**overrides: object):
    values = dict(
        patient_id="P1",
        patient_name="Doe^Jane",
        study_uid=test_uid("st"),
        series_uid=test_uid("se"),
        sop_uid=test_uid("sop", overrides.get("n", 0)),
        modality="CT",
        study_date="20240101",
        accession_number="A1",
    )
    overrides.pop("n", None)
    values.update(overrides)
    return make_instance(**values)


def _stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".trolley" not in p.parts)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("..", "_"),
        ("../../etc", "_._.._etc"),
        ("/abs/path", "_abs_path"),
        ("a/b\\c", "a_b_c"),
        (".hidden", "_hidden"),
        ("bell\x07tab\tnul\x00", "bell_tab_nul_"),
        ("", MISSING_VALUE),
        ("   ", MISSING_VALUE),
        ("Doe^Jane", "Doe^Jane"),
        ("1.2.840.10008", "1.2.840.10008"),
        ("C:\\windows", "C__windows"),
    ],
)
def test_sanitise_component(value: str, expected: str) -> None:
    result = sanitise_component(value)
    assert result == expected
    assert "/" not in result and "\\" not in result and result not in (".", "..")


def test_long_values_are_cut_but_stay_distinct() -> None:
    a = sanitise_component("x" * 300 + "a")
    b = sanitise_component("x" * 300 + "b")
    assert len(a) == MAX_COMPONENT_LENGTH == len(b)
    assert a != b


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{PatientId}/{SOPInstanceUID}.dcm", "did you mean PatientID"),
        ("{PatientID/{SOPInstanceUID}.dcm", "unbalanced braces"),
        ("{PatientID}}/{SOPInstanceUID}.dcm", "unbalanced braces"),
        ("/data/{SOPInstanceUID}.dcm", "relative path"),
        ("../{SOPInstanceUID}.dcm", "'..' path components"),
        ("{PatientID}/static.dcm", "file name must contain"),
        ("{SeriesNumber:03d}/{SOPInstanceUID}", "format specs are not supported"),
        ("a\\{SOPInstanceUID}", "use '/'"),
    ],
)
def test_bad_layouts_are_rejected(template: str, message: str) -> None:
    with pytest.raises(LayoutError, match=message.replace("(", r"\(")):
        LayoutTemplate(template)


def test_default_layout_and_atomic_write(tmp_path: Path) -> None:
    storage = StorageDir(tmp_path)
    inst = _instance()
    writer = storage.open_instance()
    writer.write(inst.data[:100])
    assert _stored_files(tmp_path) == []  # nothing visible before commit
    writer.write(inst.data[100:])
    writer.commit()
    expected = tmp_path / inst.study_uid / inst.series_uid / f"{inst.sop_uid}.dcm"
    assert _stored_files(tmp_path) == [expected]
    assert expected.read_bytes() == inst.data
    result = writer.result
    assert result is not None
    assert result.sha256 == hashlib.sha256(inst.data).hexdigest()
    assert result.size == len(inst.data)
    assert result.transfer_syntax == inst.transfer_syntax
    assert list(storage.tmp_dir.iterdir()) == []


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    storage = StorageDir(tmp_path)
    writer = storage.open_instance()
    writer.write(_instance().data[:500])
    writer.abort()
    assert _stored_files(tmp_path) == []
    assert list(storage.tmp_dir.iterdir()) == []


def test_truncated_or_non_dicom_data_is_refused(tmp_path: Path) -> None:
    storage = StorageDir(tmp_path)
    with pytest.raises(StorageError, match="not valid DICOM Part 10"):
        write_instance(storage, b"<html>not dicom</html>")
    with pytest.raises(StorageError, match="not valid DICOM Part 10"):
        write_instance(storage, _instance().data[:60])
    assert _stored_files(tmp_path) == []
    assert list(storage.tmp_dir.iterdir()) == []


def test_hostile_values_never_escape_the_root(tmp_path: Path) -> None:
    root = tmp_path / "out"
    storage = StorageDir(
        root,
        "{PatientID}/{PatientName}/{StudyDescription}/{SeriesDescription}/{AccessionNumber}.dcm",
    )
    inst = _instance(
        patient_id="../../..",
        patient_name="../../etc^passwd",
        study_description="/etc/cron.d",
        series_description="a/b\\c/../..",
        accession_number="..",
    )
    write_instance(storage, inst.data)
    files = _stored_files(root)
    assert len(files) == 1
    assert files[0].resolve().is_relative_to(root.resolve())
    assert all(part not in ("..", ".") for part in files[0].relative_to(root).parts)
    assert [p for p in tmp_path.iterdir()] == [root]


def test_missing_values_get_the_placeholder(tmp_path: Path) -> None:
    storage = StorageDir(tmp_path, "{PatientID}/{BodyPartExamined}/{SOPInstanceUID}.dcm")
    inst = _instance()
    write_instance(storage, inst.data)
    assert _stored_files(tmp_path) == [tmp_path / "P1" / MISSING_VALUE / f"{inst.sop_uid}.dcm"]


def test_layout_collision_is_an_error_not_an_overwrite(tmp_path: Path) -> None:
    storage = StorageDir(tmp_path, "{PatientID}.dcm")
    first, second = _instance(n=1), _instance(n=2)
    write_instance(storage, first.data)
    with pytest.raises(StorageError, match="maps two instances"):
        write_instance(storage, second.data)
    assert (tmp_path / "P1.dcm").read_bytes() == first.data
    write_instance(storage, first.data)  # the same instance again is fine (idempotent)


def test_symlink_planted_in_the_tree_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "P1")
    storage = StorageDir(root, "{PatientID}/{SOPInstanceUID}.dcm")
    with pytest.raises(StorageError, match="symlink"):
        write_instance(storage, _instance().data)
    assert list(outside.iterdir()) == []


def test_private_tags_and_transfer_syntax_are_kept(tmp_path: Path) -> None:
    inst = _instance(private=True, compressed=True)
    storage = StorageDir(tmp_path)
    write_instance(storage, inst.data)
    (path,) = _stored_files(tmp_path)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    assert any(elem.tag.is_private for elem in ds)


@pytest.mark.parametrize("escape", ["../outside.dcm", "a/../../outside.dcm", "/etc/outside.dcm"])
def test_a_path_that_would_leave_the_root_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, escape: str
) -> None:
    storage = StorageDir(tmp_path / "out")
    monkeypatch.setattr(storage.layout, "render", lambda _dataset: Path(escape))
    with pytest.raises(StorageError, match="refusing to write outside"):
        storage.path_for({})
