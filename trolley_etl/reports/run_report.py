"""The report a run saves for itself: the run's summary and what it changed, not every file.

The full per-instance report of the root is produced on demand by `trolley-etl report`. A
run's own report stays small however large the cohort: the summary of the root after the
run, this run's record, per study what this run stored, and the rows that are not stored
(failed, pending, missing), each with its accession and patient ID. A no-op rerun writes a
report of a few kilobytes, not another copy of every instance.
"""

from __future__ import annotations

from typing import Any

#: Rows not stored are listed up to this many (the full report has them all).
MAX_PROBLEM_ROWS = 1000


def run_report(audit: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The per-run report from the full one (`runner.report.build_report` + run fields)."""
    rows = audit.get("instances", [])
    changed: dict[str, dict[str, Any]] = {}
    stored = stored_bytes = 0
    problems = []
    for row in rows:
        if row.get("run_id") == run_id and row.get("sha256"):
            study = changed.setdefault(
                row["study_uid"],
                {
                    "accession_number": row.get("accession_number", ""),
                    "patient_id": row.get("patient_id", ""),
                    "instances": 0,
                    "bytes": 0,
                },
            )
            study["instances"] += 1
            study["bytes"] += row.get("size", 0)
            stored += 1
            stored_bytes += row.get("size", 0)
        if row.get("status") not in ("stored", "stale"):
            problems.append(row)
    small = {k: v for k, v in audit.items() if k != "instances"}
    small["runs"] = [r for r in audit.get("runs", []) if r.get("run_id") == run_id]
    small["changed"] = {"instances": stored, "bytes": stored_bytes, "studies": changed}
    small["not_stored"] = problems[:MAX_PROBLEM_ROWS]
    small["not_stored_total"] = len(problems)
    small["full_report"] = "trolley-etl report MANIFEST (json, csv, html or md)"
    return small
