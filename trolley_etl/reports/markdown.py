"""A short Markdown summary of a report, for CI job pages ($GITHUB_STEP_SUMMARY).

Short on purpose: the outcome, the attrition, what failed (at most MAX_FAILURES lines, with
accession and patient ID so they map back to the cohort list) and the last runs. The full
tables are in the HTML and JSON reports.
"""

from __future__ import annotations

from typing import Any

from trolley_etl.reports.view import build_view, human_bytes, shown

MAX_FAILURES = 20
MAX_RUNS = 5


def _md(text: Any) -> str:
    """A table cell: pipes and line breaks would break the table, backticks the code."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ") or "-"


def render_markdown(report: dict[str, Any]) -> str:
    view = build_view(report)
    icon = {"complete": "✅", "failed": "❌", "incomplete": "⚠️"}.get(view.status, "🔎")
    lines = [
        f"## {icon} trolley-etl: {_md(view.name)}",
        "",
        f"**{_md(view.status)}**: {view.instances} instances, {human_bytes(view.bytes)} in "
        f"{len(view.studies)} studies.",
        "",
        "| " + " | ".join(label for label, _ in view.funnel) + " |",
        "|" + "---:|" * len(view.funnel),
        "| " + " | ".join(shown(value) for _, value in view.funnel) + " |",
        "",
    ]
    if view.by_modality:
        lines.append(
            "Instances by modality: "
            + ", ".join(f"{_md(k)} {v}" for k, v in view.by_modality.items())
            + "."
        )
        lines.append("")
    if view.failures:
        lines += [
            f"### Failed or incomplete ({len(view.failures)})",
            "",
            "| accession | patient ID | status | reason |",
            "|---|---|---|---|",
        ]
        for f in view.failures[:MAX_FAILURES]:
            lines.append(
                f"| {_md(f.accession_number)} | {_md(f.patient_id)} | "
                f"{_md(f.status)} | {_md(f.reason)} |"
            )
        if len(view.failures) > MAX_FAILURES:
            lines.append(f"\n… and {len(view.failures) - MAX_FAILURES} more: see the full report.")
        lines.append("")
    if view.unmatched:
        lines.append(
            f"**{len(view.unmatched)} cohort rows matched no study**: "
            + ", ".join(
                f"{_md(value)} ({_md(name)})" for name, _, value in view.unmatched[:MAX_FAILURES]
            )
            + (" …" if len(view.unmatched) > MAX_FAILURES else "")
        )
        lines.append("")
    if view.runs:
        lines += [
            "### Runs",
            "",
            "| run | status | started | finished | files |",
            "|---|---|---|---|---:|",
        ]
        for run in view.runs[-MAX_RUNS:]:
            lines.append(
                f"| {_md(run.run_id)} | {_md(run.status)} | {_md(run.started_at)} | "
                f"{_md(run.finished_at or '-')} | {len(run.throughput)} |"
            )
        lines.append("")
    return "\n".join(lines)
