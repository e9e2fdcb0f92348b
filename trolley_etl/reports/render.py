"""One entry point per report format, and the CI job summary."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trolley_etl.core.errors import ConfigurationError

FORMATS = ("json", "csv", "html", "md")
#: What each format's saved copy is named with.
EXTENSIONS = {"json": "json", "csv": "csv", "html": "html", "md": "md"}


def render(report: dict[str, Any], style: str) -> str:
    from trolley_etl.runner import report as audit

    if style == "json":
        return audit.report_json(report)
    if style == "csv":
        return audit.report_csv(report)
    if style == "html":
        from trolley_etl.reports.html import render_html

        return render_html(report)
    if style == "md":
        from trolley_etl.reports.markdown import render_markdown

        return render_markdown(report)
    raise ConfigurationError(f"unknown report format {style!r}")


def append_job_summary(report: dict[str, Any]) -> Path | None:
    """Append the Markdown summary to $GITHUB_STEP_SUMMARY when a CI job page has one
    (GitHub Actions sets it; other CIs can set it to any file). Returns the file or None."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    from trolley_etl.reports.markdown import render_markdown

    path = Path(target)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(render_markdown(report) + "\n")
    return path
