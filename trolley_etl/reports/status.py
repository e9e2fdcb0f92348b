"""`status`: what the checkpoint says, as a small table per query set or as nested JSON.

Attempts are counted as the log shows them: a run tries an item up to `run.retries + 1`
times, and the checkpoint counts one attempt per run, so for the items listed here the
tries are counted from the runs' JSON logs (`item.retry` and `item.failed` events).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from trolley_etl.reports.view import human_bytes

MAX_LISTED = 20
#: Log files larger than this are not scanned for attempts (the checkpoint's count is shown).
MAX_LOG_BYTES = 256 * 2**20


def _json_field(value: Any) -> Any:
    """Checkpoint columns that hold JSON text, decoded (status JSON is nested, not quoted)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def decoded_run(run: dict[str, Any]) -> dict[str, Any]:
    return {k: _json_field(v) if k in ("summary", "provenance") else v for k, v in run.items()}


def _key(study: str, series: str = "", instance: str = "") -> tuple[str, str, str]:
    return (study, series or "", instance or "")


def attempts_from_logs(logs_dir: Path, wanted: set[tuple[str, str, str]]) -> Counter[Any]:
    """Tries per item key, from every run's log: one per `item.retry` or `item.failed`."""
    tries: Counter[Any] = Counter()
    if not wanted or not logs_dir.is_dir():
        return tries
    for log in sorted(logs_dir.glob("*.jsonl")):
        if log.stat().st_size > MAX_LOG_BYTES:
            continue
        with log.open(encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if '"item.retry"' not in line and '"item.failed"' not in line:
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                key = _key(
                    event.get("study_uid", ""),
                    event.get("series_uid", ""),
                    event.get("instance_uid", ""),
                )
                if key in wanted:
                    tries[key] += 1
    return tries


def _describe(reference: Any) -> str:
    """`study 1.2 series 1.2.3 instance 1.2.3.4`: the UIDs a person can search for."""
    parts = [f"study {reference.study_uid}"]
    for level in ("series", "instance"):
        uid = getattr(reference, f"{level}_uid", "")
        if uid:
            parts.append(f"{level} {uid}")
    return " ".join(parts)


def build_status(manifest_name: str, root: Path, checkpoint: Any) -> dict[str, Any]:
    from trolley_etl.runner.checkpoint import ItemState, state_dir

    owner = {row.study_uid: row.query_set for row in checkpoint.study_rows()}
    sets: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return sets.setdefault(
            name or "-", {"studies": 0, "items": Counter(), "instances": 0, "bytes": 0}
        )

    for name in owner.values():
        entry(name)["studies"] += 1
    item_totals, file_totals = checkpoint.totals_by_query_set()  # counted in SQL (issue 17)
    for name, state, count, _stored in item_totals:
        entry(name)["items"][str(state)] += count
    for name, count, size in file_totals:
        target = entry(name)
        target["instances"] += count
        target["bytes"] += size
    not_done = [state.value for state in ItemState if state is not ItemState.DONE]
    listed = checkpoint.items(not_done)[: MAX_LISTED * 5]
    keys = {
        i.item_id: _key(
            i.reference.study_uid,
            getattr(i.reference, "series_uid", ""),
            getattr(i.reference, "instance_uid", ""),
        )
        for i in listed
    }
    tries = attempts_from_logs(state_dir(root) / "logs", set(keys.values()))
    studies = {row.study_uid: row for row in checkpoint.study_rows()}
    problems = []
    for item in listed:
        study = studies.get(item.reference.study_uid)
        problems.append(
            {
                "state": item.state,
                "reference": _describe(item.reference),
                "accession_number": study.accession_number if study else "",
                "patient_id": study.patient_id if study else "",
                "attempts": max(item.attempts, tries.get(keys[item.item_id], 0)),
                "error": item.last_error,
            }
        )
    runs = [decoded_run(r.to_json()) for r in checkpoint.runs()]
    return {
        "manifest": manifest_name,
        "root": str(root),
        "counts": checkpoint.counts(),
        "query_sets": {name: {**v, "items": dict(v["items"])} for name, v in sets.items()},
        "last_run": runs[-1] if runs else None,
        "runs": len(runs),
        "not_done": problems,
    }


def render_status(status: dict[str, Any]) -> str:
    headers = ("query set", "studies", "done", "failed", "pending", "other", "instances", "size")
    body = []
    for name, entry in status["query_sets"].items():
        items = Counter(entry["items"])
        other = sum(v for k, v in items.items() if k not in ("done", "failed", "pending"))
        body.append(
            (
                name,
                entry["studies"],
                items["done"],
                items["failed"],
                items["pending"],
                other,
                entry["instances"],
                human_bytes(entry["bytes"]),
            )
        )
    widths = [max(len(str(r[i])) for r in [headers, *body]) for i in range(len(headers))]

    def fmt(row: Any) -> str:
        return "  ".join(
            str(v).ljust(widths[i]) if i == 0 else str(v).rjust(widths[i])
            for i, v in enumerate(row)
        ).rstrip()

    counts = status["counts"]
    first = (
        f"{status['manifest']}: {counts['done']} done, {counts['pending']} pending, "
        f"{counts['failed']} failed; {counts['files']} files, "
        f"{counts['bytes'] / 2**20:.1f} MiB in {status['root']}"
    )
    lines = [first, "", fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in body)]
    run = status["last_run"]
    if run:
        lines += [
            "",
            f"last run {run['run_id']}: {run['status']}, "
            f"started {run['started_at']}, finished {run['finished_at'] or '-'} "
            f"({status['runs']} runs so far)",
        ]
    problems = status["not_done"]
    for item in problems[:MAX_LISTED]:
        who = " ".join(x for x in (item["accession_number"], item["patient_id"]) if x)
        lines.append(
            f"  {item['state']} {who + ' ' if who else ''}{item['reference']} after "
            f"{item['attempts']} attempt(s): {item['error'] or '-'}"
        )
    if len(problems) > MAX_LISTED:
        lines.append("  ... and more: `trolley-etl report MANIFEST --format csv` lists them all")
    return "\n".join(lines) + "\n"
