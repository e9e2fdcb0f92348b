"""What a person wants to see in a report, derived from the report dict.

The HTML page and the Markdown summary show the same facts; this module computes them once.
Keys the report may lack (the per-query-set `cohort` object, expected instance counts) give
None, which the renderers print as "unknown": a number is shown only when it is known.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

UNKNOWN = "unknown"
#: Study states worst first: a study shows the worst state of its rows.
_SEVERITY = ("failed", "missing", "changed", "incomplete", "pending", "stale", "stored")


@dataclass
class StudyLine:
    study_uid: str
    query_set: str
    accession_number: str
    patient_id: str
    study_date: str
    modalities: list[str]
    series: int
    instances: int
    expected_instances: int | None
    bytes: int
    status: str


@dataclass
class Failure:
    accession_number: str
    patient_id: str
    study_uid: str
    what: str  # the series or instance UID, or "" for the whole study
    status: str
    reason: str


@dataclass
class RunLine:
    run_id: str
    status: str
    started_at: str
    finished_at: str | None
    purpose: str
    lock_drift: dict[str, Any] | None
    #: (seconds since the run's first file, cumulative bytes) per stored file
    throughput: list[tuple[float, int]] = field(default_factory=list)


@dataclass
class ReportView:
    name: str
    generated_at: str
    root: str
    status: str  # the last run's status, or "unknown"
    funnel: list[tuple[str, int | None]]
    studies: list[StudyLine]
    failures: list[Failure]
    runs: list[RunLine]
    by_modality: dict[str, int]
    by_month: dict[str, int]
    instances: int
    bytes: int
    by_status: dict[str, int]
    #: cohort rows that matched no study: (query set, row, value), when the report says
    unmatched: list[tuple[str, Any, Any]] = field(default_factory=list)


def _parse_time(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def _sum_cohort(cohort: Any, key: str) -> int | None:
    """The sum of `key` over the query sets of the `cohort` object, None if any lacks it."""
    if not isinstance(cohort, dict) or not cohort:
        return None
    total = 0
    for entry in cohort.values():
        value = entry.get(key) if isinstance(entry, dict) else None
        if isinstance(value, list):
            value = len(value)
        if not isinstance(value, int):
            return None
        total += value
    return total


def _worst(states: dict[str, int]) -> str:
    for state in _SEVERITY:
        if states.get(state):
            return state
    return next(iter(states), UNKNOWN)


def _series_and_meta(
    rows: list[dict[str, Any]],
) -> tuple[dict[str, set[str]], dict[str, dict[str, Any]]]:
    """The series UIDs of each study, and each study's descriptive keys from any of its rows
    (failed rows may carry the keys the stored rows lack, or the reverse)."""
    series_of: dict[str, set[str]] = {}
    study_meta: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.get("series_uid"):
            series_of.setdefault(row["study_uid"], set()).add(row["series_uid"])
        meta = study_meta.setdefault(row["study_uid"], {})
        for key in ("patient_id", "accession_number", "study_date", "query_set"):
            if row.get(key) and not meta.get(key):
                meta[key] = row[key]
    return series_of, study_meta


def build_view(report: dict[str, Any]) -> ReportView:
    summary = report.get("summary", {})
    # a run's own report lists only the rows not stored (reports.run_report)
    rows: list[dict[str, Any]] = report.get("instances", report.get("not_stored", []))
    series_of, study_meta = _series_and_meta(rows)
    expected = {
        s.get("study_uid"): s.get("expected_instances")
        for s in report.get("studies", [])
        if isinstance(s, dict)
    }
    studies = []
    for uid, study in summary.get("by_study", {}).items():
        meta = study_meta.get(uid, {})
        expect = study.get("expected_instances", expected.get(uid))
        studies.append(
            StudyLine(
                study_uid=uid,
                query_set=study.get("query_set") or meta.get("query_set", ""),
                accession_number=study.get("accession_number") or meta.get("accession_number", ""),
                patient_id=study.get("patient_id") or meta.get("patient_id", ""),
                study_date=study.get("study_date") or meta.get("study_date", ""),
                modalities=list(study.get("modalities", [])),
                series=len(series_of.get(uid, ())),
                instances=int(study.get("instances", 0)),
                expected_instances=expect if isinstance(expect, int) else None,
                bytes=int(study.get("bytes", 0)),
                status=_worst(study.get("status", {})),
            )
        )
    for study_line in studies:  # fewer files than the archive said it holds: not complete
        short = (
            study_line.expected_instances is not None
            and study_line.instances < study_line.expected_instances
        )
        if short and study_line.status == "stored":
            study_line.status = "incomplete"
    studies.sort(key=lambda s: (s.study_date, s.accession_number, s.study_uid))

    failures = []
    for row in rows:
        if row.get("status") in ("stored", "stale"):
            continue
        meta = study_meta.get(row["study_uid"], {})
        failures.append(
            Failure(
                accession_number=row.get("accession_number") or meta.get("accession_number", ""),
                patient_id=row.get("patient_id") or meta.get("patient_id", ""),
                study_uid=row["study_uid"],
                what=row.get("sop_instance_uid") or row.get("series_uid") or "",
                status=row.get("status", ""),
                reason=row.get("error") or row.get("status", ""),
            )
        )

    runs = []
    by_run: dict[str, list[tuple[dt.datetime, int]]] = {}
    for row in rows:
        at = _parse_time(row.get("stored_at", ""))
        if row.get("run_id") and at is not None:
            by_run.setdefault(row["run_id"], []).append((at, int(row.get("size") or 0)))
    for run in report.get("runs", []):
        points = sorted(by_run.get(run.get("run_id", ""), []))
        start = _parse_time(run.get("started_at", "")) or (points[0][0] if points else None)
        cumulative, line = 0, []
        for at, size in points:
            cumulative += size
            line.append((max(0.0, (at - start).total_seconds()) if start else 0.0, cumulative))
        runs.append(
            RunLine(
                run_id=run.get("run_id", ""),
                status=run.get("status", UNKNOWN),
                started_at=run.get("started_at", ""),
                finished_at=run.get("finished_at"),
                purpose=run.get("purpose", "run"),
                lock_drift=run.get("lock_drift"),
                throughput=line,
            )
        )

    expected_known = any(s.expected_instances is not None for s in studies)
    cohort = report.get("cohort")
    unmatched = [
        (name, entry.get("row"), entry.get("value"))
        for name, per_set in (cohort.items() if isinstance(cohort, dict) else [])
        if isinstance(per_set, dict)
        for entry in per_set.get("unmatched") or []
        if isinstance(entry, dict)
    ]
    found = _sum_cohort(cohort, "studies_found")
    dropped = _sum_cohort(cohort, "dropped_by_select")
    stored = sum(1 for s in studies if s.status == "stored")
    failed = sum(1 for s in studies if s.status not in ("stored", "incomplete"))
    funnel: list[tuple[str, int | None]] = [
        # rows asked for by name (CSV rows, listed UIDs); filter queries ask for none
        ("requested", _sum_cohort(cohort, "requested") or None),
        ("found", found),
        (
            "selected",
            found - dropped if found is not None and dropped is not None else len(studies),
        ),
        ("stored", _sum_cohort(cohort, "stored") if cohort else stored),
        (
            "incomplete",
            _sum_cohort(cohort, "incomplete")
            if cohort
            else (sum(1 for s in studies if s.status == "incomplete") if expected_known else None),
        ),
        ("failed", _sum_cohort(cohort, "failed") if cohort else failed),
    ]
    by_month = Counter(
        s.study_date[:4] + "-" + s.study_date[4:6]
        for s in studies
        if len(s.study_date) >= 6 and s.study_date[:6].isdigit()
    )
    return ReportView(
        name=report.get("manifest", {}).get("name", UNKNOWN),
        generated_at=report.get("generated_at", ""),
        root=report.get("root", ""),
        status=report.get("status") or (runs[-1].status if runs else UNKNOWN),
        funnel=funnel,
        studies=studies,
        failures=failures,
        runs=runs,
        by_modality={
            k: int(v.get("instances", 0)) for k, v in summary.get("by_modality", {}).items()
        },
        by_month=dict(sorted(by_month.items())),
        instances=int(summary.get("instances", 0)),
        bytes=int(summary.get("bytes", 0)),
        by_status=dict(summary.get("by_status", {})),
        unmatched=unmatched,
    )


def human_bytes(size: int | None) -> str:
    if size is None:
        return UNKNOWN
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def shown(value: int | None) -> str:
    return UNKNOWN if value is None else str(value)
