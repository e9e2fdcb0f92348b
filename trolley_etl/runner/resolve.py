"""The resolve and plan steps: from a manifest's query sets to retrieval units.

Search runs every query of every query set, unions the studies and drops duplicates (the
first query set that found a study keeps it), and accounts for every CSV row or listed UID
(matched or not). Plan narrows studies to the series `select` asks for (recording what it
dropped), lets the Trolley plan the retrievals (a downloader that needs series or instances
gets them searched, in parallel, only for the studies that lack them) and gives each unit
its expectation: what the archive says it holds, so that completeness can be checked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any

from trolley_etl.core.model import (
    InstanceReference,
    QueryLevel,
    Reference,
    Series,
    SeriesReference,
    Study,
    StudyReference,
)
from trolley_etl.core.query import Query
from trolley_etl.core.relative_dates import resolve_filters
from trolley_etl.core.trolley import Trolley
from trolley_etl.manifest import Manifest
from trolley_etl.manifest.models import QuerySet
from trolley_etl.runner.checkpoint import Expectation, StudyRow
from trolley_etl.runner.cohort import (
    Cohort,
    Dropped,
    QuerySetAccount,
    Unmatched,
)

#: Study UIDs per query when a query set lists them (keeps URLs and identifiers short).
UID_CHUNK = 50


@dataclass
class Found:
    query_set: str
    study: Study


def resolution_hash(manifest: Manifest) -> str:
    """Changes whenever the manifest would pull something else (not for run settings)."""
    payload = {
        "source": manifest.source.model_dump(mode="json"),
        "queries": [
            # allow_unmatched changes what the run says about the cohort, not what it pulls
            {**q.model_dump(mode="json", exclude={"allow_unmatched"}), "csv_values": q.csv_values}
            for q in manifest.queries
        ],
        "select": manifest.select.model_dump(mode="json") if manifest.select else None,
        "layout": manifest.storage.layout,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


#: Asked for with every search so that each unit gets an expected instance count.
STUDY_COUNT = "NumberOfStudyRelatedInstances"
SERIES_COUNT = "NumberOfSeriesRelatedInstances"


class RequestKind(str, Enum):
    CSV_ROW = "csv_row"  # one query per CSV row
    UIDS = "uids"  # a chunk of listed StudyInstanceUIDs
    FILTERS = "filters"  # a filter query


@dataclass(frozen=True)
class Request:
    """One query of a query set and the rows (CSV row or listed UID) it stands for."""

    query: Query
    kind: RequestKind
    asked: tuple[tuple[int, str], ...] = ()  # (row number or 1-based position, value)


@dataclass
class Searched:
    """The search step's result: the distinct studies and each query set's accounting."""

    found: list[Found]
    cohort: Cohort


@dataclass
class Planned:
    """The plan step's result: the studies kept, their units and what each unit holds."""

    kept: list[Found]
    references: list[Reference]
    expectations: dict[Reference, Expectation]


def requests_of(query_set: QuerySet) -> Iterator[Request]:
    """The queries a query set stands for, each with the rows it asks for."""
    filters = resolve_filters(query_set.filters)  # `{last: 7d}` becomes today's range
    limit = query_set.limit
    include = (STUDY_COUNT,)
    if query_set.from_csv is not None:
        column = query_set.from_csv.column
        for row, value in query_set.csv_rows:
            query = Query(filters={**filters, column: value}, limit=limit, include_fields=include)
            yield Request(query, RequestKind.CSV_ROW, ((row, value),))
    if query_set.study_uids:
        uids = list(enumerate(query_set.study_uids, start=1))
        for start in range(0, len(uids), UID_CHUNK):
            chunk = uids[start : start + UID_CHUNK]
            query = Query(
                filters={**filters, "StudyInstanceUID": [u for _, u in chunk]},
                limit=limit,
                include_fields=include,
            )
            yield Request(query, RequestKind.UIDS, tuple(chunk))
    if query_set.from_csv is None and not query_set.study_uids:
        query = Query(filters=filters, limit=limit, include_fields=include)
        yield Request(query, RequestKind.FILTERS)


def queries_of(query_set: QuerySet) -> Iterator[Query]:
    """The Query objects a query set stands for."""
    for request in requests_of(query_set):
        yield request.query


def search_cohort(
    trolley: Trolley, manifest: Manifest, on_query: Callable[[str, Query, int], None]
) -> Searched:
    """Run every query set; one Found per distinct study, and what each row matched."""
    found: dict[str, Found] = {}
    cohort: Cohort = {}
    for query_set in manifest.queries:
        account = cohort[query_set.name] = QuerySetAccount(
            allow_unmatched=query_set.allow_unmatched
        )
        seen: set[str] = set()
        for request in requests_of(query_set):
            studies = trolley.find_studies(request.query)
            on_query(query_set.name, request.query, len(studies))
            uids = {study.uid for study in studies}
            if request.kind is RequestKind.FILTERS:
                account.empty_queries += 0 if studies else 1
            for row, value in request.asked:
                account.requested += 1
                hit = bool(studies) if request.kind is RequestKind.CSV_ROW else value in uids
                if hit:
                    account.matched += 1
                else:
                    account.unmatched.append(Unmatched(row, value))
            for study in studies:
                seen.add(study.uid)
                found.setdefault(study.uid, Found(query_set.name, study))
        account.studies_found = len(seen)
    return Searched(list(found.values()), cohort)


def search(
    trolley: Trolley, manifest: Manifest, on_query: Callable[[str, Query, int], None]
) -> list[Found]:
    """Run every query set; one Found per distinct study, in query-set order."""
    return search_cohort(trolley, manifest, on_query).found


def select_rule(manifest: Manifest) -> str:
    """`select.series` as one readable line, for the report of what it dropped."""
    filters = manifest.select.series if manifest.select else {}
    shown = ", ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
        for k, v in filters.items()
    )
    return f"select.series: {shown}"


_StudyPlan = tuple[Found, list[Reference], list[Dropped], dict[Reference, Expectation]]


def plan_units(trolley: Trolley, manifest: Manifest, searched: Searched, workers: int) -> Planned:
    """Apply `select`, plan the retrieval units and give each its expected instances.

    With `run.completeness: strict` every unit gets an expectation: the count the search
    answered, or the next level down searched until one is known.
    """
    strict = manifest.run.completeness == "strict"
    rule = select_rule(manifest)

    def one(item: Found) -> _StudyPlan:
        study = item.study
        dropped: list[Dropped] = []
        if manifest.select is not None and manifest.select.series:
            query = Query(
                query_level=QueryLevel.SERIES,
                filters={**manifest.select.series, "StudyInstanceUID": study.uid},
                include_fields=(SERIES_COUNT,),
            )
            selected = [s for s in trolley.find_studies(query) if s.uid == study.uid]
            chosen = selected[0].all_series() if selected else []
            everything = _all_series(trolley, study.uid)
            kept_uids = {s.uid for s in chosen}
            dropped = [
                Dropped(study.uid, s.uid, rule) for s in everything if s.uid not in kept_uids
            ]
            for series in chosen:  # counts the filtered answer may have left out
                _fill_count(series, everything)
            study.series = chosen
            if not study.series:
                return item, [], [Dropped(study.uid, "", rule), *dropped], {}
            # A Study means the whole study to a downloader; the selection is its series.
            refs = trolley.plan(study.series)
        else:
            refs = trolley.plan([study])
        expected = {ref: expectation_of(trolley, study, ref, strict=strict) for ref in refs}
        return item, refs, dropped, expected

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="expand") as pool:
        results = list(pool.map(one, searched.found))
    expectations: dict[Reference, Expectation] = {}
    for item, _, dropped, expected in results:
        account = searched.cohort.setdefault(item.query_set, QuerySetAccount())
        account.dropped_by_select.extend(dropped)
        expectations.update(expected)
    kept = [item for item, refs, _, _ in results if refs]
    references = list(dict.fromkeys(ref for _, refs, _, _ in results for ref in refs))
    return Planned(kept, references, expectations)


def expand(
    trolley: Trolley, manifest: Manifest, found: list[Found], workers: int
) -> tuple[list[Found], list[Reference]]:
    """Apply `select` and plan the retrievals; studies left with no series are dropped."""
    planned = plan_units(trolley, manifest, Searched(found, {}), workers)
    return planned.kept, planned.references


def _all_series(trolley: Trolley, study_uid: str) -> list[Series]:
    query = Query(
        query_level=QueryLevel.SERIES,
        filters={"StudyInstanceUID": study_uid},
        include_fields=(SERIES_COUNT,),
    )
    return [
        s
        for study in trolley.find_studies(query)
        if study.uid == study_uid
        for s in study.all_series()
    ]


def _fill_count(series: Series, listed: list[Series]) -> None:
    if _count(series.data, SERIES_COUNT) is not None:
        return
    for other in listed:
        if other.uid == series.uid and _count(other.data, SERIES_COUNT) is not None:
            series.data.NumberOfSeriesRelatedInstances = _count(other.data, SERIES_COUNT)


def _count(data: Any, keyword: str) -> int | None:
    value = data.get(keyword) if data is not None else None
    if value in (None, ""):
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        return None
    return count if count >= 0 else None


def expectation_of(trolley: Trolley, study: Study, ref: Reference, *, strict: bool) -> Expectation:
    """What the archive says `ref` holds: listed instances, else a count from the search
    answer, else (strict) the next level down searched; unknown only when not strict."""
    if isinstance(ref, InstanceReference):
        return Expectation.of_uids([ref.instance_uid])
    batch = getattr(ref, "instance_uids", None)  # a batch (RAD-69) names its instances
    if batch:
        return Expectation.of_uids(batch)
    if isinstance(ref, SeriesReference):
        series = next((s for s in study.all_series() if s.uid == ref.series_uid), None)
        if series is not None and series.instances is not None:
            return Expectation.of_uids(i.uid for i in series.instances)
        count = _count(series.data, SERIES_COUNT) if series is not None else None
        if count is not None or not strict:
            return Expectation(count)
        return _listed(_list_instances(trolley, ref))
    if study.series is not None and all(s.instances is not None for s in study.series):
        return Expectation.of_uids(i.uid for i in study.all_instances())
    count = _count(study.data, STUDY_COUNT)
    if count is not None or not strict:
        return Expectation(count)
    counts = [_count(s.data, SERIES_COUNT) for s in _all_series(trolley, ref.study_uid)]
    if counts and all(c is not None for c in counts):
        return Expectation(sum(c for c in counts if c is not None))
    return _listed(_list_instances(trolley, ref))


def _listed(uids: list[str]) -> Expectation:
    """An empty listing says nothing (the archive may have lost the unit): unknown, so that
    a unit the archive then sends nothing for fails instead of being "complete" at 0."""
    return Expectation.of_uids(uids) if uids else Expectation()


def _list_instances(trolley: Trolley, ref: StudyReference | SeriesReference) -> list[str]:
    """The SOPInstanceUIDs the searcher lists under a study or series."""
    filters: dict[str, Any] = {"StudyInstanceUID": ref.study_uid}
    if isinstance(ref, SeriesReference):
        filters["SeriesInstanceUID"] = ref.series_uid
    studies = trolley.find_studies(Query(query_level=QueryLevel.INSTANCE, filters=filters))
    return [
        i.uid
        for s in studies
        if s.uid == ref.study_uid
        for i in s.all_instances()
        if not isinstance(ref, SeriesReference) or i.series_uid == ref.series_uid
    ]


def list_instances(trolley: Trolley, ref: Reference) -> list[str]:
    """The instances the archive lists under a unit (to name what is missing)."""
    if isinstance(ref, InstanceReference):
        return [ref.instance_uid]
    return _list_instances(trolley, ref)


def study_row(item: Found) -> StudyRow:
    data = item.study.data
    modalities = data.get("ModalitiesInStudy", "")
    if not isinstance(modalities, str):
        modalities = "\\".join(str(m) for m in modalities)
    return StudyRow(
        study_uid=item.study.uid,
        query_set=item.query_set,
        patient_id=str(data.get("PatientID", "")),
        accession_number=str(data.get("AccessionNumber", "")),
        study_date=str(data.get("StudyDate", "")),
        modalities=modalities,
    )
