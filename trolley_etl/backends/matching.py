"""DICOM attribute matching in Python (PS3.4 C.2.2.2), for backends that filter locally.

MINT servers understand only a few study-level parameters and a local folder has no server at
all, so both check a Query against the attributes they hold with the same rules an archive
applies: universal matching for empty values, `*`/`?` wildcards, `A-B` ranges on dates and
times, list (any-of) matching, exact UIDs. Multi-valued attributes match when any value does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.multival import MultiValue

from trolley_etl.core.model import SERIES_KEYWORDS, STUDY_KEYWORDS, QueryLevel
from trolley_etl.core.query import NUMERIC_VRS, FilterValue

_TIME_VRS = frozenset({"DA", "TM", "DT"})


def keyword_level(keyword: str) -> QueryLevel:
    """The level of the information model an attribute belongs to (for local filtering)."""
    if keyword in STUDY_KEYWORDS:
        return QueryLevel.STUDY
    if keyword in SERIES_KEYWORDS:
        return QueryLevel.SERIES
    return QueryLevel.INSTANCE


def deepest_level(keywords: Iterable[str], level: QueryLevel) -> QueryLevel:
    """The finest level needed to check these keywords, at least `level`."""
    for keyword in keywords:
        needed = keyword_level(keyword)
        if level.is_above(needed):
            level = needed
    return level


@lru_cache(maxsize=512)
def _wildcard(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    # Only * and ? are special in DICOM (fnmatch would also give [...] a meaning).
    escaped = "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile(rf"\A{escaped}\Z", re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _pad(value: str, vr: str, high: bool) -> str:
    """A date/time as a fixed-width string; a partial value covers its whole span."""
    value = re.sub(r"[+-][0-9]{4}$", "", value) if vr == "DT" else value  # offsets ignored
    value = value.replace(":", "") if vr == "TM" else value  # ACR-NEMA style 08:30:00
    width = {"DA": 8, "TM": 13, "DT": 21}[vr]  # HHMMSS.ffffff / YYYYMMDDHHMMSS.ffffff
    if vr == "TM" and len(value) > 6 and "." not in value:
        value = value[:6]
    if vr != "DA" and "." not in value:
        whole = 6 if vr == "TM" else 14
        value = value.ljust(whole, "9" if high else "0") + "."
    return value.ljust(width, "9" if high else "0")[:width]


def _match_time(value: str, condition: str, vr: str) -> bool:
    value = value.strip()
    if not value:
        return False
    is_range = condition.count("-") == 1 and not (
        vr == "DT" and re.search(r"[0-9][+-][0-9]{4}$", condition)
    )
    start, end = condition.split("-") if is_range else (condition, condition)
    low, high = _pad(value, vr, high=False), _pad(value, vr, high=True)
    if start and high < _pad(start, vr, high=False):
        return False
    return not (end and low > _pad(end, vr, high=True))


def _match_one(value: str, condition: str, vr: str) -> bool:
    if vr in _TIME_VRS:
        return _match_time(value, condition, vr)
    if vr in NUMERIC_VRS:
        try:
            return float(value) == float(condition)
        except ValueError:
            return False
    if vr == "UI":
        return value.strip("\x00 ") == condition
    text = value.strip()
    if "*" in condition or "?" in condition:
        return bool(_wildcard(condition, vr == "PN").match(text))
    return text.lower() == condition.lower() if vr == "PN" else text == condition


def _values(dataset: Dataset, keyword: str) -> list[str] | None:
    """The attribute's values as text; None when the dataset does not have it."""
    if keyword not in dataset:
        return None
    value = dataset[keyword].value
    if value is None or value == "":
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    return [str(value)]


def match_filter(dataset: Dataset, keyword: str, condition: FilterValue) -> bool | None:
    """Whether `dataset` satisfies one filter; None when it lacks the attribute."""
    conditions = condition if isinstance(condition, tuple) else (condition,)
    if conditions == ("",):
        return True  # universal matching (PS3.4 C.2.2.2.3)
    values = _values(dataset, keyword)
    if values is None:
        return None
    vr = dictionary_VR(keyword_dict[keyword])
    return any(_match_one(v, c, vr) for v in values for c in conditions)


def matches(
    dataset: Dataset,
    filters: dict[str, FilterValue],
    *,
    missing_ok: frozenset[str] = frozenset(),
) -> bool:
    """Whether `dataset` satisfies every filter.

    A filter on an attribute the dataset lacks fails, unless its keyword is in `missing_ok`
    (attributes a server already filtered on but did not return).
    """
    for keyword, condition in filters.items():
        result = match_filter(dataset, keyword, condition)
        if result is False or (result is None and keyword not in missing_ok):
            return False
    return True


__all__ = ["deepest_level", "keyword_level", "match_filter", "matches"]
