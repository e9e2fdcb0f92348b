"""LocalFolder: index a messy folder, search it like an archive, re-organise it via the Trolley."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from trolley_etl import Query, QueryLevel, StorageDir, Trolley
from trolley_etl._harness.dicomgen import (
    COHORT_STUDIES,
    GeneratedInstance,
    make_instance,
    standard_cohort,
)
from trolley_etl.backends import LocalFolder
from trolley_etl.core.errors import ObjectNotFoundError

STUDIES = {spec.accession_number: spec for spec in COHORT_STUDIES}


@pytest.fixture(scope="module")
def cohort() -> list[GeneratedInstance]:
    return standard_cohort()


def _messy(root: Path, cohort: list[GeneratedInstance]) -> Path:
    """Nested random folder names, no extensions, notes, a fake DICOM, and duplicate copies."""
    rng = random.Random(7)
    for inst in cohort:
        folder = root.joinpath(*(f"{rng.getrandbits(24):06x}" for _ in range(rng.randint(0, 3))))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"IM{rng.getrandbits(32):08X}").write_bytes(inst.data)
    (root / "copy").mkdir()
    for inst in cohort[:3]:
        (root / "copy" / f"{inst.sop_uid}.dcm").write_bytes(inst.data)
    (root / "README.txt").write_text("scanned from CD, 2024\n")
    (root / "thumb.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    (root / "fake.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"garbage")
    return root


@pytest.fixture()
def folder(tmp_path, cohort) -> LocalFolder:
    return LocalFolder(_messy(tmp_path / "messy", cohort), index_path=tmp_path / "index.sqlite")


def _accessions(studies) -> list[str]:
    return sorted(str(s.data.AccessionNumber) for s in studies)


def test_index_skips_non_dicom_and_refreshes_incrementally(folder, cohort, tmp_path) -> None:
    stats = folder.refresh()
    assert stats.added == len(cohort) + 3 + 3 and stats.not_dicom == 3
    again = folder.refresh()
    assert (again.added, again.updated, again.removed) == (0, 0, 0)
    new = make_instance(
        patient_id="TRL009",
        patient_name="New^Patient",
        study_uid="1.2.3.9",
        series_uid="1.2.3.9.1",
        sop_uid="1.2.3.9.1.1",
        modality="CT",
        study_date="20250101",
        accession_number="ACC9",
    )
    (folder.root / "late").mkdir()
    (folder.root / "late" / "x").write_bytes(new.data)
    (folder.root / "README.txt").unlink()
    stats = folder.refresh()
    assert (stats.added, stats.removed, stats.updated) == (1, 1, 0)
    assert [s.uid for s in folder.search(Query(PatientID="TRL009"))] == ["1.2.3.9"]


@pytest.mark.parametrize(
    "query, expected",
    [
        (Query(PatientID="TRL00*"), ["ACC1001", "ACC1002", "ACC1003", "ACC1004", "ACC1005"]),
        (Query(PatientID="TRL00?"), ["ACC1001", "ACC1002", "ACC1003", "ACC1004", "ACC1005"]),
        (Query(PatientName="roe*"), ["ACC1003", "ACC1004"]),  # PN: case-insensitive
        (Query(StudyDate="20240101-20240131"), ["ACC1003", "ACC1004"]),
        (Query(StudyDate="-20231231"), ["ACC1001", "ACC1002"]),
        (Query(StudyDate="20241101-"), ["ACC1005"]),
        (Query(StudyDate="20230115"), ["ACC1001"]),
        (Query(StudyTime="0800-1000"), ["ACC1001", "ACC1003"]),
        (Query(ModalitiesInStudy="OT"), ["ACC1004"]),
        (Query(Modality=["OT", "MR"]), ["ACC1002", "ACC1003", "ACC1004", "ACC1005"]),
        (Query(AccessionNumber=["ACC1002", "ACC1005"]), ["ACC1002", "ACC1005"]),
        (
            Query(StudyInstanceUID=[STUDIES["ACC1001"].study_uid, STUDIES["ACC1004"].study_uid]),
            ["ACC1001", "ACC1004"],
        ),
        (Query(StudyDescription="*KNEE"), ["ACC1005"]),
        (Query(PatientID="NOBODY"), []),
    ],
)
def test_study_search_filters(folder, query, expected) -> None:
    assert _accessions(folder.search(query)) == expected


def test_series_and_instance_levels(folder, cohort) -> None:
    studies = folder.search(Query(query_level=QueryLevel.SERIES, Modality="CT", PatientID="TRL001"))
    assert [s.data.AccessionNumber for s in studies] == ["ACC1001"]
    assert {s.uid for s in studies[0].all_series()} == {
        STUDIES["ACC1001"].series_uid(0),
        STUDIES["ACC1001"].series_uid(1),
    }
    spec = STUDIES["ACC1002"]
    (study,) = folder.search(
        Query(query_level=QueryLevel.INSTANCE, SeriesInstanceUID=spec.series_uid(1))
    )
    expected = {i.sop_uid for i in cohort if i.series_uid == spec.series_uid(1)}
    assert {i.uid for i in study.all_instances()} == expected  # duplicates counted once
    (summary,) = folder.search(Query(AccessionNumber="ACC1002"))
    assert summary.data.NumberOfStudyRelatedInstances == 6
    assert summary.data.ModalitiesInStudy == "MR"  # one value


def test_limit_offset(folder) -> None:
    every = [s.uid for s in folder.search(Query())]
    assert len(every) == 6
    assert [s.uid for s in folder.search(Query(limit=2, offset=3))] == every[3:5]


def test_messy_folder_reorganised_into_the_standard_layout(folder, cohort, tmp_path) -> None:
    out = tmp_path / "organised"
    trolley = Trolley(searcher=folder, downloader=folder, storage=StorageDir(out))
    stored = trolley.download(trolley.find_studies(Query()))
    assert len(stored) == len(cohort)  # each duplicate stored once
    originals = {i.sop_uid: i for i in cohort}
    for item in stored:
        inst = originals[item.sop_instance_uid]
        assert item.relative_path == Path(inst.study_uid, inst.series_uid, f"{inst.sop_uid}.dcm")
        assert item.path.read_bytes() == inst.data
    files = [p for p in out.rglob("*") if p.is_file() and ".trolley" not in p.parts]
    assert len(files) == len(cohort)


def test_custom_layout_and_single_series(folder, cohort, tmp_path) -> None:
    spec = STUDIES["ACC1004"]
    trolley = Trolley(searcher=folder, downloader=folder)
    (study,) = trolley.find_studies(
        Query(query_level=QueryLevel.SERIES, SeriesInstanceUID=spec.series_uid(1))
    )
    out = tmp_path / "by-patient"
    trolley.storage = StorageDir(out, "{PatientID}/{StudyDate}/{Modality}/{SOPInstanceUID}.dcm")
    (item,) = trolley.download(study.all_series())
    assert item.relative_path.parts[:3] == ("TRL002", "20240125", "OT")


def test_fetch_of_unknown_object_and_bad_path(folder, tmp_path) -> None:
    from trolley_etl import StudyReference

    with pytest.raises(ObjectNotFoundError, match="no files"):
        folder.fetch(StudyReference("1.2.3.4.5.6"), StorageDir(tmp_path / "o"))
    with pytest.raises(ObjectNotFoundError, match="not a folder"):
        LocalFolder(tmp_path / "does-not-exist")


def test_default_index_lives_in_the_folder_and_is_not_indexed(tmp_path, cohort) -> None:
    root = tmp_path / "plain"
    root.mkdir()
    for inst in cohort[:4]:
        (root / inst.sop_uid).write_bytes(inst.data)
    folder = LocalFolder(root)
    assert len(folder.search(Query(query_level=QueryLevel.INSTANCE)).pop().all_instances()) == 4
    assert (root / ".trolley-index.sqlite").exists()
    assert folder.refresh().added == 0
    assert sorted(os.listdir(root))[0].startswith(".trolley-index")
