"""The object tree, references at the levels downloaders need, and merging."""

import pytest
from pydicom import Dataset

from trolley_etl import (
    Instance,
    InstanceReference,
    QueryLevel,
    Series,
    SeriesReference,
    Study,
    StudyReference,
)
from trolley_etl.core.errors import MissingReferencesError
from trolley_etl.core.model import contained_references, merge_studies, tree_from_rows


def _row(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_study_without_series_cannot_give_series_references() -> None:
    study = Study("1.1")
    assert study.contained_references(QueryLevel.STUDY) == [StudyReference("1.1")]
    with pytest.raises(MissingReferencesError) as info:
        study.contained_references(QueryLevel.SERIES)
    assert info.value.needed_level is QueryLevel.SERIES


def test_references_raise_when_asked_for_deeper_levels() -> None:
    with pytest.raises(MissingReferencesError):
        StudyReference("1").contained_references(QueryLevel.INSTANCE)
    with pytest.raises(MissingReferencesError):
        SeriesReference("1", "2").contained_references(QueryLevel.INSTANCE)
    ref = InstanceReference("1", "2", "3")
    assert ref.contained_references(QueryLevel.STUDY) == [ref]


def test_full_tree_gives_references_at_each_level() -> None:
    series = Series(
        "1.2", "1", instances=[Instance("1.2.1", "1.2", "1"), Instance("1.2.2", "1.2", "1")]
    )
    study = Study("1", series=[series, Series("1.3", "1", instances=[])])
    assert study.contained_references(QueryLevel.SERIES) == [
        SeriesReference("1", "1.2"),
        SeriesReference("1", "1.3"),
    ]
    assert contained_references([study], QueryLevel.INSTANCE) == [
        InstanceReference("1", "1.2", "1.2.1"),
        InstanceReference("1", "1.2", "1.2.2"),
    ]
    with pytest.raises(MissingReferencesError):
        Study("2", series=[Series("2.1", "2")]).contained_references(QueryLevel.INSTANCE)


def test_tree_from_series_rows_merges_studies() -> None:
    rows = [
        _row(StudyInstanceUID="1", SeriesInstanceUID="1.1", Modality="CT", PatientID="P"),
        _row(StudyInstanceUID="1", SeriesInstanceUID="1.2", Modality="MR", PatientID="P"),
        _row(StudyInstanceUID="2", SeriesInstanceUID="2.1", Modality="CT", PatientID="Q"),
    ]
    studies = tree_from_rows(rows, QueryLevel.SERIES)
    assert [s.uid for s in studies] == ["1", "2"]
    assert [s.uid for s in studies[0].all_series()] == ["1.1", "1.2"]
    assert studies[0].data.PatientID == "P"
    assert "Modality" not in studies[0].data  # series attributes stay on the series
    assert studies[0].all_series()[1].data.Modality == "MR"
    assert studies[0].all_series()[0].instances is None


def test_merge_partial_results_about_one_study() -> None:
    first = tree_from_rows(
        [_row(StudyInstanceUID="1", SeriesInstanceUID="1.1", SOPInstanceUID="1.1.1")],
        QueryLevel.INSTANCE,
    )
    second = tree_from_rows(
        [
            _row(StudyInstanceUID="1", SeriesInstanceUID="1.1", SOPInstanceUID="1.1.2"),
            _row(StudyInstanceUID="1", SeriesInstanceUID="1.2", SOPInstanceUID="1.2.1"),
        ],
        QueryLevel.INSTANCE,
    )
    described = [Study("1", data=_row(StudyInstanceUID="1", PatientID="P"))]
    merged = merge_studies([*described, *first, *second])
    assert len(merged) == 1
    study = merged[0]
    assert study.data.PatientID == "P"
    assert [i.uid for i in study.all_instances()] == ["1.1.1", "1.1.2", "1.2.1"]
