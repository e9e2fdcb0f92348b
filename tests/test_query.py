"""Query validation: DICOM keywords, matching syntax, clear errors."""

import datetime as dt

import pytest
from pydantic import ValidationError

from trolley_etl import Query, QueryLevel


def test_keywords_become_filters() -> None:
    query = Query(PatientID="123*", StudyDate="20240101-20240131")
    assert query.filters == {"PatientID": "123*", "StudyDate": "20240101-20240131"}
    assert query.query_level is QueryLevel.STUDY


def test_lists_dates_and_levels_are_normalised() -> None:
    query = Query(
        query_level="SERIES",
        StudyInstanceUID=["1.2.3", "1.2.4"],
        StudyDate=dt.date(2024, 1, 31),
        Modality=["CT"],
        include_fields=["PatientName"],
        limit=10,
        offset=5,
    )
    assert query.query_level is QueryLevel.SERIES
    assert query.filters["StudyInstanceUID"] == ("1.2.3", "1.2.4")
    assert query.filters["StudyDate"] == "20240131"
    assert query.filters["Modality"] == "CT"
    assert query.include_fields == ("PatientName",)
    assert query.dicom_value("StudyInstanceUID") == "1.2.3\\1.2.4"


@pytest.mark.parametrize("value", ["20240101", "20240101-20240131", "20240101-", "-20240131", ""])
def test_valid_dates(value: str) -> None:
    assert Query(StudyDate=value).filters["StudyDate"] == value


@pytest.mark.parametrize("value", ["0830", "083000", "083000.123", "08-12", "1200-"])
def test_valid_times(value: str) -> None:
    Query(StudyTime=value)


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"PatientId": "1"}, "unknown DICOM keyword 'PatientId' (did you mean PatientID?)"),
        ({"NotAKeyword": "1"}, "unknown DICOM keyword 'NotAKeyword'"),
        ({"StudyDate": "2024-01-01"}, "malformed date '2024-01-01', expected YYYYMMDD"),
        ({"StudyDate": "20240230"}, "'20240230' is not a calendar date"),
        ({"StudyDate": "20240301-20240101"}, "ends before it starts"),
        ({"StudyDate": "-"}, "empty range"),
        ({"StudyTime": "256000"}, "malformed time '256000'"),
        ({"StudyInstanceUID": "1.2.*"}, "'1.2.*' is not a valid UID"),
        ({"StudyInstanceUID": "01.2"}, "is not a valid UID"),
        ({"StudyInstanceUID": []}, "an empty list matches nothing"),
        ({"SeriesNumber": "abc"}, "'abc' is not a number"),
        ({"StudyDate": "2024*"}, "malformed date"),
        ({"ReferencedStudySequence": "x"}, "sequence attributes cannot be used"),
        ({"PatientID": "A\\B"}, "give several values as a list"),
        ({"PatientID": True}, "a boolean is not a DICOM value"),
    ],
)
def test_invalid_filters_are_clear_errors(filters: dict, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        Query(**filters)
    assert message in str(info.value)


def test_invalid_include_field_and_paging() -> None:
    with pytest.raises(ValidationError, match="did you mean PatientName"):
        Query(include_fields=["PatientNmae"])
    with pytest.raises(ValidationError):
        Query(limit=0)
    with pytest.raises(ValidationError):
        Query(offset=-1)
    with pytest.raises(ValidationError):
        Query(query_level="patient")


def test_with_filters_validates_again() -> None:
    query = Query(PatientID="1").with_filters(StudyDate="20240101")
    assert query.filters == {"PatientID": "1", "StudyDate": "20240101"}
    with pytest.raises(ValidationError):
        query.with_filters(StudyDate="yesterday")


def test_built_in_keyword_vrs_match_the_data_dictionary() -> None:
    """The keywords checked without pydicom have the VR pydicom's dictionary gives them."""
    from pydicom.datadict import dictionary_VR, keyword_dict

    from trolley_etl.core.model import SERIES_KEYWORDS, STUDY_KEYWORDS, TREE_KEYS
    from trolley_etl.core.query import COMMON_KEYWORD_VRS, check_keyword
    from trolley_etl.core.storage import HEADER_KEYWORDS

    for keyword, vr in COMMON_KEYWORD_VRS.items():
        assert keyword in keyword_dict and dictionary_VR(keyword_dict[keyword]) == vr, keyword
        assert check_keyword(keyword) == vr
    # the keywords the tree, the layouts and the audit use are all in the table
    used = {*STUDY_KEYWORDS, *SERIES_KEYWORDS, *HEADER_KEYWORDS, *TREE_KEYS[QueryLevel.INSTANCE]}
    assert used <= set(COMMON_KEYWORD_VRS)
    # and the others still come from the dictionary, misspellings with a hint
    assert check_keyword("InstitutionAddress") == "ST"
    with pytest.raises(ValueError, match=r"'StudyDat' \(did you mean StudyDate\?\)"):
        check_keyword("StudyDat")
