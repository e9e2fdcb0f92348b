"""Query splitting: searches that hit an archive's result cap are split until none does.

Archives cap the number of results one search returns (often 500 or 1,000), usually without
saying so. A search whose answer is as large as the cap (the backend's `max_results`), or
whose backend signals that more results exist than it could page through (ResultsCappedError,
e.g. a QIDO-RS `Warning: 299` the server would not page past), is split on its StudyDate
range: in halves, recursively, down to single days, then a day by StudyTime, until every part
is under the cap. The parts are united and deduplicated. What cannot be split (no date range,
a part one second long, more parts than MAX_PARTS, or an archive whose parts miss studies
the whole answer had) raises ResultsCappedError: never a silent truncation.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from trolley_etl.core.backend import Searcher
from trolley_etl.core.errors import ConfigurationError, ResultsCappedError
from trolley_etl.core.model import QueryLevel, Study, merge_studies
from trolley_etl.core.query import Query

#: Searches one split query may cost at most (each part is one search).
MAX_PARTS = 4096
#: Open date ranges are closed with these bounds before they are split.
EARLIEST_DATE = dt.date(1900, 1, 1)
DAY_SECONDS = 86400

Event = Callable[..., None]


class Splitter:
    """Runs one search through `search_once`, splitting it while it is at the cap.

    `max_results` is the archive's cap on one search (None: only a backend's own signal
    counts). `on_event(name, **fields)` hears about each split, for the run log.
    """

    def __init__(
        self,
        search_once: Callable[[Query], list[Study]],
        max_results: int | None = None,
        *,
        on_event: Event | None = None,
        max_parts: int = MAX_PARTS,
    ) -> None:
        if max_results is not None and max_results < 1:
            raise ConfigurationError("max_results must be at least 1")
        self.search_once = search_once
        self.max_results = max_results
        self.on_event = on_event
        self.max_parts = max_parts

    def search(self, query: Query) -> list[Study]:
        if query.query_level is QueryLevel.INSTANCE:
            return self.search_once(query)  # the cap is on studies and series (see README)
        budget = [self.max_parts]
        whole = (
            query.model_copy(update={"limit": None, "offset": 0}) if self._splits(query) else query
        )
        studies = self._search(whole, budget, depth=0)
        if whole is query:
            return studies
        ordered = sorted(studies, key=_date_order)
        end = None if query.limit is None else query.offset + query.limit
        return ordered[query.offset : end]

    def _splits(self, query: Query) -> bool:
        """Whether a query's limit leaves room to reach the cap (else it is asked as it is)."""
        return query.limit is None or self.max_results is None or query.limit >= self.max_results

    def _search(self, query: Query, budget: list[int], depth: int) -> list[Study]:
        budget[0] -= 1
        if budget[0] < 0:
            raise ResultsCappedError(
                f"{describe(query)}: still at the archive's cap after {self.max_parts} "
                "searches; narrow the query (a shorter date range, more filters)"
            )
        try:
            studies = self.search_once(query)
            count = count_results(studies, query.query_level)
            capped = self.max_results is not None and count >= self.max_results
            reason = f"{count} results, the cap is {self.max_results}"
        except ResultsCappedError as exc:
            studies, capped, reason = [], True, str(exc)
        if not capped:
            return studies
        parts = split_query(query)
        if parts is None:
            raise ResultsCappedError(
                f"{describe(query)}: {reason}, and the query has no StudyDate range left to "
                "split (the archive may hold more than it answered); give the query set a "
                "StudyDate range, or raise max_results if the archive allows more"
            )
        if self.on_event is not None:
            self.on_event(
                "search.split",
                filters=dict(query.filters),
                reason=reason,
                parts=[dict(p.filters) for p in parts],
                depth=depth,
            )
        found = merge_studies([s for part in parts for s in self._search(part, budget, depth + 1)])
        missed = {s.uid for s in studies} - {s.uid for s in found}
        if missed:
            raise ResultsCappedError(
                f"{describe(query)}: {len(missed)} studies of the capped answer match none of "
                f"its parts {[dict(p.filters) for p in parts]} (studies without a StudyDate or "
                "StudyTime?); the archive's cap cannot be worked around for this query"
            )
        return found


class SplittingSearcher(Searcher):
    """Any searcher, with its searches split at the archive's cap (see Splitter)."""

    def __init__(
        self, searcher: Searcher, max_results: int | None = None, *, on_event: Event | None = None
    ) -> None:
        self.searcher = searcher
        self.splitter = Splitter(searcher.search, max_results, on_event=on_event)

    def search(self, query: Query) -> list[Study]:
        return self.splitter.search(query)

    def close(self) -> None:
        self.searcher.close()


def split_search(
    search_once: Callable[[Query], list[Study]],
    query: Query,
    max_results: int | None,
    on_event: Event | None = None,
) -> list[Study]:
    """One search through `search_once`, split while at the cap (for backends' `search`)."""
    return Splitter(search_once, max_results, on_event=on_event).search(query)


def count_results(studies: list[Study], level: QueryLevel) -> int:
    """Rows a search answered: studies, or series for a series-level search."""
    if level is QueryLevel.STUDY:
        return len(studies)
    return sum(len(s.series or []) for s in studies)


def describe(query: Query) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in query.filters.items())
    return f"the {query.query_level.value} search ({shown})"


def split_query(query: Query) -> list[Query] | None:
    """Two or more queries whose union is `query`, narrower in date or time; None if none."""
    if query.query_level is not QueryLevel.STUDY:
        return None  # StudyDate is not a matching key below the study level everywhere
    date = query.filters.get("StudyDate")
    if isinstance(date, tuple):
        return [_with(query, StudyDate=value) for value in date]
    if not date:
        return None
    start, end = date_bounds(date)
    if start < end:
        middle = start + (end - start) // 2
        return [
            _with(query, StudyDate=_date_range(start, middle)),
            _with(query, StudyDate=_date_range(middle + dt.timedelta(days=1), end)),
        ]
    times = _time_bounds(query.filters.get("StudyTime"))
    if times is None:
        return None
    first, last = times
    if last <= first:
        return None
    middle_s = first + (last - first) // 2
    day = start.strftime("%Y%m%d")
    return [
        _with(query, StudyDate=day, StudyTime=f"{_hms(first)}-{_hms(middle_s)}"),
        _with(query, StudyDate=day, StudyTime=f"{_hms(middle_s + 1)}-{_hms(last)}"),
    ]


def date_bounds(value: str, today: dt.date | None = None) -> tuple[dt.date, dt.date]:
    """The first and last day of a DA value or range; open ends become 1900-01-01 / today."""
    start_text, _, end_text = value.partition("-") if "-" in value else (value, "", value)
    start = _date(start_text) if start_text else EARLIEST_DATE
    end = _date(end_text) if end_text else (today or dt.date.today())
    return start, max(start, end)


def _date(text: str) -> dt.date:
    return dt.datetime.strptime(text[:8], "%Y%m%d").date()


def _date_range(start: dt.date, end: dt.date) -> str:
    first, last = start.strftime("%Y%m%d"), end.strftime("%Y%m%d")
    return first if first == last else f"{first}-{last}"


def _time_bounds(value: str | tuple[str, ...] | None) -> tuple[int, int] | None:
    """A TM range as (first, last) second of the day; None for values that are not ranges."""
    if not value:
        return 0, DAY_SECONDS - 1
    if isinstance(value, tuple) or "-" not in value:
        return None
    start, _, end = value.partition("-")
    return (
        _seconds(start, pad="00") if start else 0,
        _seconds(end, pad="59") if end else DAY_SECONDS - 1,
    )


def _seconds(text: str, pad: str) -> int:
    digits = text.split(".")[0]
    digits += pad * ((6 - len(digits)) // 2)
    return int(digits[:2]) * 3600 + int(digits[2:4]) * 60 + int(digits[4:6])


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def _with(query: Query, **filters: str) -> Query:
    return query.with_filters(**filters)


def _date_order(study: Study) -> tuple[str, str, str]:
    data = study.data
    return (str(data.get("StudyDate", "")), str(data.get("StudyTime", "")), study.uid)
