"""Search rows set aside for a bad UID: logged, kept in the checkpoint, and never silent.

A row the archive returned but that cannot be fetched safely (core.uids) is part of what
the query matched, so the cohort is not complete without it: the run that resolved it, and
every resumed run until a `--refresh` finds none, ends `failed` (exit 1) instead of 0, and
the rows are in the run's provenance in the audit report.
"""

from __future__ import annotations

import json
from typing import Any

from trolley_etl.core.uids import rejected_rows
from trolley_etl.runner.checkpoint import Checkpoint

META_KEY = "invalid_search_rows"
#: Rows kept in the checkpoint and the report, at most (the count is always complete).
KEPT = 100


def log_rejected(logger: Any) -> list[dict[str, str]]:
    """Drain the rows rejected since the last call, logging each as `search.invalid_row`."""
    rows = rejected_rows.drain()
    for row in rows:
        logger.warning("search.invalid_row", **row)
    return rows


def remember(checkpoint: Checkpoint, run_id: str, rows: list[dict[str, str]]) -> None:
    """Record the rejected rows of a resolution (replacing those of an earlier one)."""
    checkpoint.set_meta(META_KEY, json.dumps({"count": len(rows), "rows": rows[:KEPT]}))
    if rows:
        checkpoint.add_run_provenance(
            run_id, invalid_search_rows=rows[:KEPT], invalid_search_row_count=len(rows)
        )


def recorded(checkpoint: Checkpoint) -> int:
    """How many rows the current resolution had to set aside."""
    try:
        return int(json.loads(checkpoint.get_meta(META_KEY) or "{}").get("count", 0))
    except (ValueError, AttributeError):
        return 0
