"""A backend-agnostic query, validated when it is built.

Filters are DICOM keywords with DICOM matching semantics (PS3.4 C.2.2.2): `*`/`?` wildcards
on text, `A-B` ranges (open on either side) on dates and times, lists of UIDs. Each backend
translates a Query into its own protocol (QIDO-RS parameters, a C-FIND identifier, ...).
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trolley_etl.core.errors import QueryError
from trolley_etl.core.model import QueryLevel

FilterValue = str | tuple[str, ...]

#: VRs whose values may use `*` and `?` wildcards (PS3.4 C.2.2.2.4).
WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
NUMERIC_VRS = frozenset({"IS", "DS", "US", "UL", "SS", "SL", "FL", "FD", "UV", "SV"})

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_TIME = re.compile(r"^([01][0-9]|2[0-3])([0-5][0-9]([0-5][0-9](\.[0-9]{1,6})?)?)?$")
_DATETIME = re.compile(
    r"^[0-9]{4}([0-9]{2}([0-9]{2}([0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?)?)?)?([+-][0-9]{4})?$"
)


#: The VRs of the keywords that manifests, layouts and searches use most, as pydicom's data
#: dictionary gives them (a test compares the two): checking these needs no pydicom, which is
#: slow to import (it loads numpy), so `trolley-etl status` reads a manifest without it.
COMMON_KEYWORD_VRS: dict[str, str] = {
    "AccessionNumber": "SH",
    "BodyPartExamined": "CS",
    "InstanceNumber": "IS",
    "InstitutionName": "LO",
    "IssuerOfPatientID": "LO",
    "ModalitiesInStudy": "CS",
    "Modality": "CS",
    "NumberOfSeriesRelatedInstances": "IS",
    "NumberOfStudyRelatedInstances": "IS",
    "NumberOfStudyRelatedSeries": "IS",
    "PatientBirthDate": "DA",
    "PatientID": "LO",
    "PatientName": "PN",
    "PatientSex": "CS",
    "PerformedProcedureStepStartDate": "DA",
    "ReferringPhysicianName": "PN",
    "SOPClassUID": "UI",
    "SOPInstanceUID": "UI",
    "SeriesDate": "DA",
    "SeriesDescription": "LO",
    "SeriesInstanceUID": "UI",
    "SeriesNumber": "IS",
    "SeriesTime": "TM",
    "StudyDate": "DA",
    "StudyDescription": "LO",
    "StudyID": "SH",
    "StudyInstanceUID": "UI",
    "StudyTime": "TM",
}


def suggest_keyword(name: str) -> str:
    """' (did you mean X?)' for a misspelt DICOM keyword, or ''."""
    from pydicom.datadict import keyword_dict

    close = difflib.get_close_matches(name, keyword_dict.keys(), n=1, cutoff=0.75)
    if not close:
        lowered = {k.lower(): k for k in keyword_dict}
        if name.lower() in lowered:
            close = [lowered[name.lower()]]
    return f" (did you mean {close[0]}?)" if close else ""


def check_keyword(name: str) -> str:
    """Return the VR of a DICOM keyword, or raise QueryError with a hint."""
    vr = COMMON_KEYWORD_VRS.get(name)
    if vr is not None:
        return vr
    from pydicom.datadict import dictionary_VR, keyword_dict  # the rest: on first use

    if name not in keyword_dict:
        raise QueryError(f"unknown DICOM keyword {name!r}{suggest_keyword(name)}")
    return dictionary_VR(keyword_dict[name])


def _check_date(value: str, keyword: str) -> None:
    if len(value) != 8 or not value.isdigit():
        raise QueryError(f"{keyword}: malformed date {value!r}, expected YYYYMMDD")
    try:
        dt.datetime.strptime(value, "%Y%m%d")
    except ValueError:
        raise QueryError(f"{keyword}: {value!r} is not a calendar date") from None


def _check_single(value: str, keyword: str, vr: str) -> None:
    if vr == "DA":
        _check_date(value, keyword)
    elif vr == "TM":
        if not _TIME.match(value):
            raise QueryError(f"{keyword}: malformed time {value!r}, expected HHMMSS[.FFFFFF]")
    elif vr == "DT":
        if not _DATETIME.match(value):
            raise QueryError(f"{keyword}: malformed date-time {value!r}, expected YYYYMMDDHHMMSS")
        if len(value) >= 8:
            _check_date(value[:8], keyword)


def _check_range(value: str, keyword: str, vr: str) -> None:
    """A date, time or date-time, or a range of them (`start-end`, either side open)."""
    if value.count("-") != 1 or (vr == "DT" and re.search(r"[0-9][+-][0-9]{4}$", value)):
        _check_single(value, keyword, vr)  # one value (a DT may end in a UTC offset)
        return
    start, end = value.split("-")
    if not start and not end:
        raise QueryError(f"{keyword}: empty range {value!r}")
    for part in (start, end):
        if part:
            _check_single(part, keyword, vr)
    if start and end and start > end:
        raise QueryError(f"{keyword}: range {value!r} ends before it starts")


def _check_value(value: str, keyword: str, vr: str) -> None:
    if value == "":
        return  # universal matching: the attribute is only asked to be returned
    if vr in ("DA", "TM", "DT"):
        _check_range(value, keyword, vr)
        return
    if vr == "UI":
        if not _UID.match(value) or len(value) > 64:
            raise QueryError(f"{keyword}: {value!r} is not a valid UID")
        return
    if vr in NUMERIC_VRS:
        try:
            float(value)
        except ValueError:
            raise QueryError(f"{keyword}: {value!r} is not a number") from None
        return
    if vr == "SQ":
        raise QueryError(f"{keyword}: sequence attributes cannot be used as filters")
    if vr not in WILDCARD_VRS and ("*" in value or "?" in value):
        raise QueryError(f"{keyword}: wildcards are not allowed for VR {vr}")
    if "\\" in value:
        raise QueryError(f"{keyword}: give several values as a list, not with backslashes")


def normalise_filter(keyword: str, value: Any) -> FilterValue:
    """Validate one filter and return it as a string or a tuple of strings."""
    vr = check_keyword(keyword)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = tuple(_to_text(v, keyword) for v in value)
        if not items:
            raise QueryError(f"{keyword}: an empty list matches nothing")
        for item in items:
            if item == "":
                raise QueryError(f"{keyword}: empty value in a list")
            _check_value(item, keyword, vr)
        return items if len(items) > 1 else items[0]
    text = _to_text(value, keyword)
    _check_value(text, keyword, vr)
    return text


def _to_text(value: Any, keyword: str) -> str:
    if isinstance(value, bool):
        raise QueryError(f"{keyword}: a boolean is not a DICOM value")
    if isinstance(value, dt.datetime):
        return value.strftime("%Y%m%d%H%M%S")
    if isinstance(value, dt.date):
        return value.strftime("%Y%m%d")
    if isinstance(value, dt.time):
        return value.strftime("%H%M%S")
    if isinstance(value, (str, int, float)):
        return str(value)
    raise QueryError(f"{keyword}: unsupported value type {type(value).__name__}")


class Query(BaseModel):
    """What to search for, independent of the protocol.

    DICOM keywords may be given directly as keyword arguments:
    `Query(PatientID="123*", StudyDate="20240101-20240131")`; they land in `filters`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    query_level: QueryLevel = QueryLevel.STUDY
    filters: dict[str, FilterValue] = Field(default_factory=dict)
    include_fields: tuple[str, ...] = ()
    limit: int | None = Field(default=None, ge=1)
    offset: int = Field(default=0, ge=0)

    def __init__(self, **data: Any) -> None:
        """Accept DICOM keywords as keyword arguments (they are moved into `filters`)."""
        super().__init__(**data)

    @model_validator(mode="before")
    @classmethod
    def _keywords_to_filters(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        loose = {k: v for k, v in data.items() if k not in known}
        if not loose:
            return data
        rest = {k: v for k, v in data.items() if k in known}
        filters = dict(rest.get("filters") or {})
        for keyword, value in loose.items():
            if keyword in filters:
                raise QueryError(f"{keyword} is given twice")
            filters[keyword] = value
        rest["filters"] = filters
        return rest

    @field_validator("filters", mode="before")
    @classmethod
    def _validate_filters(cls, value: Any) -> dict[str, FilterValue]:
        if not isinstance(value, dict):
            raise QueryError("filters must be a mapping of DICOM keyword to value")
        return {str(k): normalise_filter(str(k), v) for k, v in value.items()}

    @field_validator("include_fields", mode="before")
    @classmethod
    def _validate_include_fields(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        for keyword in value:
            check_keyword(keyword)
        return tuple(value)

    @field_validator("query_level", mode="before")
    @classmethod
    def _level_from_text(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def with_filters(self, **filters: Any) -> Query:
        """A copy with more (validated) filters."""
        merged = {**self.filters, **filters}
        return Query(
            query_level=self.query_level,
            filters=merged,
            include_fields=self.include_fields,
            limit=self.limit,
            offset=self.offset,
        )

    def with_level(self, level: QueryLevel) -> Query:
        """The same query at another level."""
        return self.model_copy(update={"query_level": level})

    def dicom_value(self, keyword: str) -> str:
        """The filter value as DICOM writes it: several values joined by backslash."""
        value = self.filters[keyword]
        return "\\".join(value) if isinstance(value, tuple) else value
