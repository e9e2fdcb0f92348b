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


class RunChanges:
    """What one run stored (per study) and the rows not stored, one report row at a time."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.studies: dict[str, dict[str, Any]] = {}
        self.instances = self.bytes = 0
        self.problems: list[dict[str, Any]] = []
        self.problem_total = 0

    def add(self, row: dict[str, Any]) -> None:
        if row.get("run_id") == self.run_id and row.get("sha256"):
            study = self.studies.setdefault(
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
            self.instances += 1
            self.bytes += row.get("size", 0)
        if row.get("status") not in ("stored", "stale"):
            self.problem_total += 1
            if len(self.problems) < MAX_PROBLEM_ROWS:
                self.problems.append(row)


def run_report(
    audit: dict[str, Any], run_id: str, changes: RunChanges | None = None
) -> dict[str, Any]:
    """The per-run report from the full one (`runner.report.build_report` + run fields);
    `changes` when they were gathered as the report's rows were made (then `instances`
    need not hold every row)."""
    if changes is None:
        changes = RunChanges(run_id)
        for row in audit.get("instances", []):
            changes.add(row)
    small = {k: v for k, v in audit.items() if k != "instances"}
    small["runs"] = [r for r in audit.get("runs", []) if r.get("run_id") == run_id]
    small["changed"] = {
        "instances": changes.instances,
        "bytes": changes.bytes,
        "studies": changes.studies,
    }
    small["not_stored"] = changes.problems
    small["not_stored_total"] = changes.problem_total
    small["full_report"] = "trolley-etl report MANIFEST (json, csv, html or md)"
    return small
