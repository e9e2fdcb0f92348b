"""The audit report and the BagIt payload manifest of a storage root.

The report answers a data-protection officer's questions from the checkpoint alone: which
objects left the archive (one row per instance, with its UIDs, patient and study keys, path,
size and SHA-256 computed while it was streamed), when and from where (per run: start and
end, user, host, tool version, manifest and lock hashes, endpoints without credentials),
and what failed. It never contains a secret: endpoints pass through `describe_source`, and
environment values are never read here.

`manifest-sha256.txt` at the storage root lists every stored file as `<sha256>  <path>`
relative to the root: the format of a BagIt payload manifest (RFC 8493) and of
`sha256sum -c`, so the export can be checked without trolley-etl.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from trolley_etl import __version__
from trolley_etl.core.constants import STATE_DIR
from trolley_etl.core.files import file_sha256, recorded_size_problem
from trolley_etl.core.relative_dates import resolved_ranges
from trolley_etl.deid.audit import report_section as deid_report_section
from trolley_etl.manifest import Manifest
from trolley_etl.runner.atomic import write_atomic
from trolley_etl.runner.backends import describe_source
from trolley_etl.runner.checkpoint import (
    DONE,
    FAILED,
    INCOMPLETE,
    PENDING,
    STALE,
    Checkpoint,
    FileRecord,
    Item,
    now,
)
from trolley_etl.runner.cohort import allowed_unmatched, cohort_report
from trolley_etl.runner.lockfile import lock_path_for

REPORT_VERSION = 1
BAG_MANIFEST = "manifest-sha256.txt"
BAGIT_DECLARATION = "bagit.txt"
BAG_INFO = "bag-info.txt"
#: Files trolley-etl writes at the root next to the data (not payload, not unexpected).
ROOT_TAG_FILES = frozenset({BAG_MANIFEST, BAGIT_DECLARATION, BAG_INFO})
#: BagIt payload directory: a layout under it makes the root a valid bag.
BAG_PAYLOAD_DIR = "data"

CSV_COLUMNS = (
    "status",
    "study_uid",
    "series_uid",
    "sop_instance_uid",
    "sop_class_uid",
    "modality",
    "patient_id",
    "accession_number",
    "study_date",
    "query_set",
    "path",
    "size",
    "sha256",
    "transfer_syntax",
    "source",
    "run_id",
    "stored_at",
    "error",
)


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container uid with no passwd entry
        return str(os.getuid())


def run_provenance(
    manifest: Manifest,
    manifest_path: Path,
    root: Path,
    *,
    lock_path: Path | None,
    lock_sha256: str | None,
    purpose: str = "run",
) -> dict[str, Any]:
    """Who ran what, where, from which archive: recorded in the checkpoint at run start."""
    return {
        "purpose": purpose,
        "manifest_path": str(manifest_path.absolute()),
        "manifest_sha256": file_sha256(manifest_path),
        "lock_path": str(lock_path.absolute()) if lock_path else None,
        "lock_sha256": lock_sha256,
        "tool_version": __version__,
        "user": current_user(),
        "host": socket.gethostname(),
        "root": str(root),
        "search": describe_source(manifest.source.search),
        "download": describe_source(manifest.source.effective_download),
        **({"resolved_dates": dates} if (dates := resolved_ranges(manifest)) else {}),
    }


def build_report(
    checkpoint: Checkpoint,
    manifest: Manifest,
    manifest_path: Path,
    root: Path,
    *,
    sizes: dict[str, int] | None = None,
    all_instances: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The whole report as one JSON-ready dict; file status from a stat (verify re-hashes).

    `sizes` (path -> size, from a bucket listing) stands for the stat where the files are
    objects (issue 19). With `all_instances` False, `instances` keeps only the rows that are
    not a file stored as recorded (what a run's own report lists), and `on_row` sees every
    row as it is made: memory then does not grow with the number of files.
    """
    item_states = {item.item_id: item for item in checkpoint.items()}
    study_rows = {row.study_uid: row for row in checkpoint.study_rows()}
    query_sets = {uid: row.query_set for uid, row in study_rows.items()}
    rows: list[dict[str, Any]] = []
    summary = Summary()

    def take(row: dict[str, Any]) -> None:
        summary.add(row)
        if on_row is not None:
            on_row(row)
        if all_instances or row["status"] not in ("stored", "stale"):
            rows.append(row)

    folder = str(root)  # a look at every stored file: plain strings, no Path per file
    for record in checkpoint.files():
        item = item_states.get(record.item_id)
        take(
            {
                "status": _file_status(
                    os.path.join(folder, record.path),
                    record.size,
                    item.state if item else None,
                    None if sizes is None else sizes.get(record.path, -1),
                ),
                "study_uid": record.study_uid,
                "series_uid": record.series_uid,
                "sop_instance_uid": record.sop_instance_uid,
                "sop_class_uid": record.sop_class_uid or "",
                "modality": record.modality or "",
                "patient_id": record.patient_id or "",
                "accession_number": record.accession_number or "",
                "study_date": record.study_date or "",
                "query_set": query_sets.get(record.study_uid, ""),
                "path": record.path,
                "size": record.size,
                "sha256": record.sha256,
                "transfer_syntax": record.transfer_syntax or "",
                "source": record.source or "",
                "run_id": record.run_id or "",
                "stored_at": record.stored_at,
                "error": "",
            }
        )
    for item in item_states.values():
        if item.state == INCOMPLETE:  # one row per missing instance where they are named
            ref = item.reference
            for uid in item.missing_uids or ("",):
                take(
                    {
                        **dict.fromkeys(CSV_COLUMNS, ""),
                        "status": INCOMPLETE,
                        "study_uid": ref.study_uid,
                        "series_uid": getattr(ref, "series_uid", ""),
                        "sop_instance_uid": uid,
                        "query_set": query_sets.get(ref.study_uid, ""),
                        "size": 0,
                        "error": item.last_error or "",
                    }
                )
        if item.state in (FAILED, PENDING):  # no instances known: one row for the item
            ref = item.reference
            take(
                {
                    **dict.fromkeys(CSV_COLUMNS, ""),
                    "status": item.state,
                    "study_uid": ref.study_uid,
                    "series_uid": getattr(ref, "series_uid", ""),
                    "sop_instance_uid": getattr(ref, "instance_uid", ""),
                    "query_set": query_sets.get(ref.study_uid, ""),
                    "size": 0,
                    "error": item.last_error or "",
                    **_study_keys(study_rows.get(ref.study_uid)),  # map it back to the cohort list
                }
            )
    runs = []
    for run in checkpoint.runs():
        provenance = json.loads(run.provenance or "{}")
        runs.append(
            {
                "run_id": run.run_id,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                "status": run.status,
                "manifest_sha256": run.manifest_hash,
                "counts": json.loads(run.summary) if run.summary else None,
                **{k: v for k, v in provenance.items() if k != "manifest_sha256"},
            }
        )
    lock_path = lock_path_for(manifest_path)
    return {
        "report_version": REPORT_VERSION,
        "generated_at": now(),
        "generated_by": {
            "user": current_user(),
            "host": socket.gethostname(),
            "tool_version": __version__,
        },
        "manifest": {
            "name": manifest.name,
            "path": str(manifest_path.absolute()),
            "sha256": file_sha256(manifest_path) if manifest_path.exists() else None,
            "resolution_hash": checkpoint.get_meta("resolution_hash"),
        },
        "lock": {
            "path": str(lock_path.absolute()),
            "sha256": file_sha256(lock_path) if lock_path.exists() else None,
            "used_by_checkpoint": checkpoint.get_meta("lock_hash"),
        },
        "root": str(root),
        "deid": deid_report_section(checkpoint.path),
        "runs": runs,
        "summary": _with_unit_counts(summary.result(checkpoint.counts()), item_states),
        "cohort": cohort_report(checkpoint, allowed_unmatched(manifest.queries)),
        "units": [_unit_row(item, query_sets) for item in item_states.values()],
        "instances": rows,
    }


def _study_keys(row: Any) -> dict[str, str]:
    """Patient ID, accession and date of a study as searched (for rows without a file)."""
    if row is None:
        return {}
    return {
        "patient_id": row.patient_id or "",
        "accession_number": row.accession_number or "",
        "study_date": row.study_date or "",
    }


def _unit_row(item: Item, query_sets: dict[str, str]) -> dict[str, Any]:
    """One retrieval unit: what the archive said it holds and what was stored."""
    ref = item.reference
    return {
        "state": item.state,
        "level": ref.level.value,
        "study_uid": ref.study_uid,
        "series_uid": getattr(ref, "series_uid", ""),
        "sop_instance_uid": getattr(ref, "instance_uid", ""),
        "query_set": query_sets.get(ref.study_uid, ""),
        "expected_instances": item.expected.count,
        "stored_instances": item.stored_instances,
        "missing_uids": list(item.missing_uids),
        "extra_instances": item.extra_instances,
        "attempts": item.attempts,
        "error": item.last_error or "",
    }


def _with_unit_counts(summary: dict[str, Any], items: dict[int, Item]) -> dict[str, Any]:
    """Each study row gets `expected_instances` (None while any unit's count is unknown)
    and `stored_instances`; the summary counts archive drift (instances beyond expected)."""
    expected: dict[str, int | None] = {}
    for item in items.values():
        if item.state == STALE:
            continue
        uid = item.reference.study_uid
        count = item.expected.count
        known = expected.get(uid, 0)
        expected[uid] = None if count is None or known is None else known + count
    for uid, study in summary["by_study"].items():
        study["expected_instances"] = expected.get(uid)
        study["stored_instances"] = study["instances"]
    summary["archive_drift_instances"] = sum(
        i.extra_instances for i in items.values() if i.state == DONE
    )
    return summary


def _file_status(
    path: Path | str, size: int, item_state: str | None, listed: int | None = None
) -> str:
    """`listed` is the size an object-storage listing gave (-1: not listed); local files
    are looked at on disk."""
    if listed is not None:
        problem = "missing" if listed < 0 else ("changed" if listed != size else None)
    else:
        problem = recorded_size_problem(path, size)
    if problem is not None:
        return problem
    return "stale" if item_state == STALE else "stored"


class Summary:
    """Counts by status, modality and study (instance figures only where files exist),
    gathered one report row at a time, so the rows of a large root need not be kept."""

    def __init__(self) -> None:
        self.instances = self.bytes = 0
        self.by_status: Counter[str] = Counter()
        self.by_modality: dict[str, dict[str, int]] = {}
        self.by_study: dict[str, dict[str, Any]] = {}

    def add(self, row: dict[str, Any]) -> None:
        self.by_status[row["status"]] += 1
        study = self.by_study.get(row["study_uid"])
        if study is None:
            study = self.by_study[row["study_uid"]] = {
                "instances": 0,
                "bytes": 0,
                "modalities": set(),
                "status": Counter(),
                "patient_id": "",
                "accession_number": "",
                "study_date": "",
                "query_set": row["query_set"],
            }
        study["status"][row["status"]] += 1
        if not row["sha256"]:
            return
        self.instances += 1
        self.bytes += row["size"]
        modality = self.by_modality.setdefault(
            row["modality"] or "unknown", {"instances": 0, "bytes": 0}
        )
        modality["instances"] += 1
        modality["bytes"] += row["size"]
        study["instances"] += 1
        study["bytes"] += row["size"]
        study["modalities"].add(row["modality"] or "unknown")
        for key in ("patient_id", "accession_number", "study_date"):
            study[key] = study[key] or row[key]

    def result(self, items: dict[str, int]) -> dict[str, Any]:
        for study in self.by_study.values():
            study["modalities"] = sorted(study["modalities"])
            study["status"] = dict(sorted(study["status"].items()))
        return {
            "instances": self.instances,
            "bytes": self.bytes,
            "studies": len(self.by_study),
            "by_status": dict(sorted(self.by_status.items())),
            "by_modality": dict(sorted(self.by_modality.items())),
            "by_study": dict(sorted(self.by_study.items())),
            "items": items,
        }


def report_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def report_csv(report: dict[str, Any]) -> str:
    """One row per instance (and per failed or pending item); provenance is in the JSON."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in report["instances"]:
        writer.writerow({key: row.get(key, "") for key in CSV_COLUMNS})
    return buffer.getvalue()


def save_report(root: Path, text: str, name: str) -> Path:
    """A copy under `root/.trolley/reports/`, written atomically."""
    path = root / STATE_DIR / "reports" / name
    write_atomic(path, text)
    return path


def report_name(extension: str) -> str:
    return f"report-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{extension}"


# --- BagIt ------------------------------------------------------------------------------------


def bag_path(path: str) -> str:
    """RFC 8493 2.1.3: CR, LF and % are percent-encoded in manifest paths."""
    return path.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def write_bag_manifests(
    root: Path, records: Iterable[FileRecord | tuple[str, str, int]], name: str
) -> bool:
    """Write `manifest-sha256.txt`; also `bagit.txt` and `bag-info.txt` when every file lies
    under `data/` (then the root is a valid bag). Returns whether it is a valid bag.

    `records` are file records, or (path, SHA-256, size) as `Checkpoint.file_checksums`."""
    entries = sorted(r if isinstance(r, tuple) else (r.path, r.sha256, r.size) for r in records)
    lines = "".join(f"{sha}  {bag_path(path)}\n" for path, sha, _ in entries)
    write_atomic(root / BAG_MANIFEST, lines)
    is_bag = bool(entries) and all(p.startswith(BAG_PAYLOAD_DIR + "/") for p, _, _ in entries)
    if is_bag:
        write_atomic(
            root / BAGIT_DECLARATION, "BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"
        )
        oxum = f"{sum(size for _, _, size in entries)}.{len(entries)}"
        write_atomic(
            root / BAG_INFO,
            f"Bagging-Date: {time.strftime('%Y-%m-%d')}\n"
            f"External-Identifier: {name}\nPayload-Oxum: {oxum}\n"
            f"Bag-Software-Agent: trolley-etl {__version__}\n",
        )
    else:  # a declaration left from another layout would claim a bag that is not one
        (root / BAGIT_DECLARATION).unlink(missing_ok=True)
        (root / BAG_INFO).unlink(missing_ok=True)
    return is_bag
