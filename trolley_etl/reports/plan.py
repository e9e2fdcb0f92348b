"""The `plan` table: what a run would pull, one row per study, with totals.

Counts come from what the search answered: the series kept by `select` (or listed while
planning), the archive's NumberOfStudyRelated* attributes where it sends them. A value the
archive did not give is None and shown as "unknown", never as 0. Sizes are an estimate only
when earlier pulls into the same root tell the average size of an instance; else unknown.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from typing import Any

from trolley_etl.reports.view import UNKNOWN, human_bytes

COLUMNS = (
    "query_set",
    "accession_number",
    "patient_id",
    "study_date",
    "modalities",
    "series_kept",
    "series_total",
    "instances",
    "estimated_bytes",
    "study_uid",
)
HEADERS = (
    "query set",
    "accession",
    "patient ID",
    "date",
    "modalities",
    "series",
    "instances",
    "est. size",
)


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def plan_row(query_set: str, study: Any, average_size: float | None) -> dict[str, Any]:
    """One study as found by the search (a core.model.Study after expand)."""
    data = study.data
    series_total = _int(data.get("NumberOfStudyRelatedSeries"))
    series = study.series
    series_kept = len(series) if series is not None else series_total
    if series is not None:
        known = [_int(s.data.get("NumberOfSeriesRelatedInstances")) for s in series]
        listed = [len(s.instances) if s.instances is not None else None for s in series]
        per_series = [k if k is not None else n for k, n in zip(known, listed, strict=True)]
        counted = [v for v in per_series if v is not None]
        instances = sum(counted) if len(counted) == len(per_series) else None
        if series_total is None and series_kept == 0:
            series_total = None
    else:
        instances = _int(data.get("NumberOfStudyRelatedInstances"))
    estimate = round(instances * average_size) if instances is not None and average_size else None
    modalities = _text(data.get("ModalitiesInStudy")) or "\\".join(
        sorted({_text(s.data.get("Modality")) for s in series or [] if s.data.get("Modality")})
    )
    return {
        "query_set": query_set,
        "accession_number": _text(data.get("AccessionNumber")),
        "patient_id": _text(data.get("PatientID")),
        "study_date": _text(data.get("StudyDate")),
        "modalities": modalities,
        "series_kept": series_kept,
        "series_total": series_total,
        "instances": instances,
        "estimated_bytes": estimate,
        "study_uid": study.uid,
    }


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def total(key: str) -> int | None:
        values = [r[key] for r in rows]
        return sum(values) if all(v is not None for v in values) else None

    return {
        "studies": len(rows),
        "series_kept": total("series_kept"),
        "series_total": total("series_total"),
        "instances": total("instances"),
        "estimated_bytes": total("estimated_bytes"),
    }


def _shown(value: int | None) -> str:
    return UNKNOWN if value is None else str(value)


def _series(row: dict[str, Any]) -> str:
    kept, total = row["series_kept"], row["series_total"]
    return f"{_shown(kept)} / {_shown(total)}"


def render_table(rows: list[dict[str, Any]], items: int) -> str:
    """Aligned columns with a header and a totals line (the last line names the counts)."""
    body = [
        (
            r["query_set"],
            r["accession_number"] or "-",
            r["patient_id"] or "-",
            r["study_date"] or "-",
            r["modalities"] or "-",
            _series(r),
            _shown(r["instances"]),
            "unknown" if r["estimated_bytes"] is None else "~" + human_bytes(r["estimated_bytes"]),
        )
        for r in rows
    ]
    sums = totals(rows)
    size = sums["estimated_bytes"]
    footer = (
        "total",
        "",
        "",
        "",
        "",
        _series(sums),
        _shown(sums["instances"]),
        "unknown" if size is None else "~" + human_bytes(size),
    )
    widths = [max(len(str(line[i])) for line in [HEADERS, *body, footer]) for i in range(8)]
    numeric = {5, 6, 7}

    def fmt(line: Iterable[Any]) -> str:
        cells = [
            str(v).rjust(widths[i]) if i in numeric else str(v).ljust(widths[i])
            for i, v in enumerate(line)
        ]
        return "  ".join(cells).rstrip()

    out = [fmt(HEADERS), fmt("-" * w for w in widths), *(fmt(line) for line in body)]
    out += [fmt("-" * w for w in widths), fmt(footer)]
    out.append(f"{len(rows)} studies, {items} retrieval items")
    return "\n".join(out) + "\n"


def sorted_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Query sets in manifest order, then by date and accession: how people scan a list."""
    order = {name: i for i, name in reversed(list(enumerate(r["query_set"] for r in rows)))}
    return sorted(
        rows,
        key=lambda r: (
            order[r["query_set"]],
            r["study_date"],
            r["accession_number"],
            r["study_uid"],
        ),
    )


def render_plan(rows: list[dict[str, Any]], items: int, style: str) -> str:
    rows = sorted_rows(rows)
    if style == "json":
        return (
            json.dumps({"studies": rows, "totals": totals(rows), "items": items}, indent=2) + "\n"
        )
    if style == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
        return buffer.getvalue()
    return render_table(rows, items)


def average_instance_size(checkpoint_counts: dict[str, int] | None) -> float | None:
    """Bytes per stored instance in the root so far, the basis of size estimates."""
    if not checkpoint_counts or not checkpoint_counts.get("files"):
        return None
    return checkpoint_counts["bytes"] / checkpoint_counts["files"]
