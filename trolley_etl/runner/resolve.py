"""The search and expand steps: from a manifest's query sets to retrieval references.

Search runs every query of every query set, unions the studies and drops duplicates (the
first query set that found a study keeps it). Expand narrows studies to the series `select`
asks for, then lets the Trolley plan the retrievals: a downloader that needs series or
instances gets them searched, in parallel, only for the studies that lack them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from trolley_etl.core.model import QueryLevel, Reference, Study
from trolley_etl.core.query import Query
from trolley_etl.core.relative_dates import resolve_filters
from trolley_etl.core.trolley import Trolley
from trolley_etl.manifest import Manifest
from trolley_etl.manifest.models import QuerySet
from trolley_etl.runner.checkpoint import StudyRow

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
            {**q.model_dump(mode="json"), "csv_values": q.csv_values} for q in manifest.queries
        ],
        "select": manifest.select.model_dump(mode="json") if manifest.select else None,
        "layout": manifest.storage.layout,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def queries_of(query_set: QuerySet) -> Iterator[Query]:
    """The Query objects a query set stands for."""
    filters = resolve_filters(query_set.filters)  # `{last: 7d}` becomes today's range
    if query_set.from_csv is not None:
        column = query_set.from_csv.column
        for value in query_set.csv_values:
            yield Query(filters={**filters, column: value}, limit=query_set.limit)
    if query_set.study_uids:
        uids = query_set.study_uids
        for start in range(0, len(uids), UID_CHUNK):
            chunk = uids[start : start + UID_CHUNK]
            yield Query(filters={**filters, "StudyInstanceUID": chunk}, limit=query_set.limit)
    if query_set.from_csv is None and not query_set.study_uids:
        yield Query(filters=filters, limit=query_set.limit)


def search(
    trolley: Trolley, manifest: Manifest, on_query: Callable[[str, Query, int], None]
) -> list[Found]:
    """Run every query set; one Found per distinct study, in query-set order."""
    found: dict[str, Found] = {}
    for query_set in manifest.queries:
        for query in queries_of(query_set):
            studies = trolley.find_studies(query)
            on_query(query_set.name, query, len(studies))
            for study in studies:
                found.setdefault(study.uid, Found(query_set.name, study))
    return list(found.values())


def expand(
    trolley: Trolley, manifest: Manifest, found: list[Found], workers: int
) -> tuple[list[Found], list[Reference]]:
    """Apply `select` and plan the retrievals; studies left with no series are dropped."""

    def one(item: Found) -> tuple[Found, list[Reference]]:
        study = item.study
        if manifest.select is not None and manifest.select.series:
            query = Query(
                query_level=QueryLevel.SERIES,
                filters={**manifest.select.series, "StudyInstanceUID": study.uid},
            )
            selected = [s for s in trolley.find_studies(query) if s.uid == study.uid]
            study.series = selected[0].all_series() if selected else []
            if not study.series:
                return item, []
            # A Study means the whole study to a downloader; the selection is its series.
            return item, trolley.plan(study.series)
        return item, trolley.plan([study])

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="expand") as pool:
        results = list(pool.map(one, found))
    kept = [item for item, refs in results if refs]
    references = list(dict.fromkeys(ref for _, refs in results for ref in refs))
    return kept, references


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
