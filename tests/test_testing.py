"""`trolley_etl.testing`: the public in-memory archive users test their own code with."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pydicom
import pytest

from trolley_etl import DownloadError, Query, QueryLevel, Trolley
from trolley_etl.testing import FakeArchive, make_dataset

STUDY = "1.2.826.0.1.3680043.8.498.10"


def _archive(**misbehaviour: object) -> FakeArchive:
    datasets = [
        make_dataset(study_uid=STUDY, series_uid=f"{STUDY}.1", PatientID="P1", AccessionNumber="A1")
        for _ in range(3)
    ]
    datasets.append(make_dataset(PatientID="P2", AccessionNumber="A2"))
    return FakeArchive(datasets, **misbehaviour)  # type: ignore[arg-type]


def test_a_fake_archive_built_from_datasets_is_searched_and_pulled(tmp_path: Path) -> None:
    archive = _archive()
    trolley = Trolley(archive.downloader(), archive.searcher())
    study = trolley.find_study(Query(AccessionNumber="A1"))
    assert study.uid == STUDY
    stored = trolley.download(study, tmp_path)
    assert len(stored) == 3
    assert {pydicom.dcmread(s.path).PatientID for s in stored} == {"P1"}
    assert [q.filters for q in archive.searches] == [{"AccessionNumber": "A1"}]


def test_search_answers_carry_the_instance_counts_unless_told_not_to() -> None:
    counted = _archive().searcher().search(Query(query_level=QueryLevel.SERIES, PatientID="P1"))
    assert counted[0].series is not None
    assert counted[0].series[0].data.NumberOfSeriesRelatedInstances == 3
    silent = _archive(counts_in_answers=False).searcher()
    bare = silent.search(Query(query_level=QueryLevel.SERIES, PatientID="P1"))
    assert bare[0].series is not None
    assert "NumberOfSeriesRelatedInstances" not in bare[0].series[0].data


def test_misbehaviour_is_seen_by_the_caller(tmp_path: Path) -> None:
    archive = _archive(fail_first=1)
    trolley = Trolley(archive.downloader(), archive.searcher())
    with pytest.raises(DownloadError) as caught:
        trolley.download(trolley.find_study(Query(AccessionNumber="A1")), tmp_path)
    assert caught.value.failures[0][1].transient  # type: ignore[attr-defined]
    assert len(trolley.download(trolley.find_study(Query(AccessionNumber="A1")), tmp_path)) == 3


def test_the_public_testing_module_needs_no_test_only_dependency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(sys.modules):
        if name.startswith(("trolley_etl.testing", "trolley_etl._harness.dicomgen", "numpy")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy now fails
    testing = importlib.import_module("trolley_etl.testing")
    assert testing.FakeArchive([testing.make_dataset()]).held
    with pytest.raises(ImportError, match=r"trolley-etl\[test\]"):
        importlib.import_module("trolley_etl._harness.dicomgen")
