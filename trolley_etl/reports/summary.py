"""The closing summary of a run: what happened, in a few lines a person reads.

Printed to stderr at the end of every `run`, also with `--quiet`: studies, series, instances
and size on disk, how long it took, and when something is missing, how much and where to
look (the log file, `status`, the report).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trolley_etl.reports.view import human_bytes
from trolley_etl.runner.checkpoint import open_checkpoint

_DONE_WORD = {
    "complete": "complete",
    "failed": "finished with failures",
    "interrupted": "interrupted",
    "incomplete": "incomplete",
}


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def stored_totals(root: Path) -> dict[str, int]:
    """Studies, series, instances and bytes the checkpoint records as stored."""
    checkpoint = open_checkpoint(root, read_only=True)
    try:
        return checkpoint.stored_totals()
    finally:
        checkpoint.close()


def run_summary(
    manifest: Path,
    root: Path,
    status: str,
    counts: dict[str, int],
    seconds: float,
    report_path: Path | None,
    log_path: Path | None,
) -> str:
    totals = stored_totals(root)
    lines = [
        f"{_DONE_WORD.get(status, status)}: {totals['studies']} studies, {totals['series']} "
        f"series, {totals['instances']} instances, {human_bytes(totals['bytes'])} in {root} "
        f"(this run took {_duration(seconds)})"
    ]
    failed = counts.get("failed", 0)
    pending = counts.get("pending", 0)
    incomplete = counts.get("incomplete", 0)
    if failed or pending or incomplete:
        parts = [
            f"{n} {word}"
            for n, word in (
                (failed, "failed"),
                (incomplete, "incomplete"),
                (pending, "not fetched yet"),
            )
            if n
        ]
        lines.append(
            f"{', '.join(parts)} retrieval items: `trolley-etl status {manifest}` lists "
            "them" + (f"; the log is {log_path}" if log_path else "")
        )
        if status != "interrupted":
            lines.append(f"rerun `trolley-etl run {manifest}` to try them again")
    if report_path:
        lines.append(f"report: {report_path}")
    return "\n".join(lines) + "\n"


def load_report(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None
