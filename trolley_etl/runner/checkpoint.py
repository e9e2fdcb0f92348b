"""The checkpoint: what a manifest resolved to and what is durably on disk, in SQLite.

It lives in `storage.root/.trolley/checkpoint.sqlite`. SQLite in WAL mode with
`synchronous=FULL` makes each commit durable, so after a crash the checkpoint says exactly
what was recorded. Files are recorded only after they were renamed into place and fsynced; an
item is marked done only after all its files are recorded. A crash between rename and record
leaves a file the checkpoint does not know: the rerun fetches the item again and the rename
replaces the file with identical bytes, so nothing is lost or duplicated.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trolley_etl.core.constants import CHECKPOINT_NAME, STATE_DIR
from trolley_etl.core.model import (
    InstanceReference,
    Reference,
    SeriesReference,
    StudyReference,
)
from trolley_etl.runner.sqlite_safety import connect_read_only, damaged_checkpoint_error

if TYPE_CHECKING:  # core.storage loads pydicom, which reading a checkpoint does not need
    from trolley_etl.core.storage import StoredInstance

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT,
    status TEXT NOT NULL, manifest_hash TEXT NOT NULL, summary TEXT
);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, query_set TEXT NOT NULL, patient_id TEXT,
    accession_number TEXT, study_date TEXT, modalities TEXT
);
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY, study_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
    instance_uid TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT, updated_at TEXT,
    UNIQUE (study_uid, series_uid, instance_uid)
);
CREATE INDEX IF NOT EXISTS items_state ON items (state);
CREATE TABLE IF NOT EXISTS files (
    sop_instance_uid TEXT PRIMARY KEY, item_id INTEGER NOT NULL, study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL,
    transfer_syntax TEXT, sop_class_uid TEXT, source TEXT, stored_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_item ON files (item_id);
"""
#: Columns added after the first release: created with ALTER TABLE when an older checkpoint
#: lacks them, so existing checkpoints stay usable (their old rows read as NULL).
ADDED_COLUMNS = {
    "runs": {"provenance": "TEXT"},
    "files": {
        "modality": "TEXT",
        "patient_id": "TEXT",
        "accession_number": "TEXT",
        "study_date": "TEXT",
        "run_id": "TEXT",
    },
}

PENDING, DONE, FAILED, STALE = "pending", "done", "failed", "stale"


def state_dir(root: Path) -> Path:
    """The folder under a storage root that trolley-etl owns."""
    return root / STATE_DIR


def open_checkpoint(root: Path, *, read_only: bool = False) -> Checkpoint:
    """The checkpoint of a storage root (created if there is none, unless `read_only`)."""
    return Checkpoint(state_dir(root) / CHECKPOINT_NAME, read_only=read_only)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Item:
    item_id: int
    reference: Reference
    state: str
    attempts: int
    last_error: str | None


def reference_of(study: str, series: str, instance: str) -> Reference:
    if instance:
        return InstanceReference(study, series, instance)
    if series:
        return SeriesReference(study, series)
    return StudyReference(study)


def _key(reference: Reference) -> tuple[str, str, str]:
    series = getattr(reference, "series_uid", "")
    instance = getattr(reference, "instance_uid", "")
    return reference.study_uid, series, instance


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    query_set: str
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    modalities: str = ""


class Checkpoint:
    """One SQLite database per storage root. Safe to use from several threads."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        if read_only:  # issue 13: status, report, verify on a read-only root
            self._db = connect_read_only(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(SCHEMA)
            self._add_missing_columns()
        except sqlite3.DatabaseError as exc:
            raise damaged_checkpoint_error(path, exc) from None

    def _add_missing_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns.items():
                if name not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- meta and runs -------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def start_run(
        self, run_id: str, manifest_hash: str, provenance: dict[str, Any] | None = None
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO runs (run_id, started_at, status, manifest_hash, provenance) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, now(), "running", manifest_hash,
                 json.dumps(provenance or {}, sort_keys=True)),
            )  # fmt: skip

    def add_run_provenance(self, run_id: str, **values: Any) -> None:
        """Facts learnt during a run (lock drift, the lock used) for its audit record."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                "SELECT provenance FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            merged = {**json.loads(row[0] or "{}"), **values} if row else values
            self._db.execute(
                "UPDATE runs SET provenance = ? WHERE run_id = ?",
                (json.dumps(merged, sort_keys=True), run_id),
            )
            self._db.execute("COMMIT")

    def finish_run(self, run_id: str, status: str, summary: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE runs SET finished_at = ?, status = ?, summary = ? WHERE run_id = ?",
                (now(), status, json.dumps(summary, sort_keys=True), run_id),
            )

    def runs(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, started_at, finished_at, status, manifest_hash, summary, "
                "provenance FROM runs ORDER BY started_at"
            ).fetchall()
        keys = ("run_id", "started_at", "finished_at", "status", "manifest_hash", "summary",
                "provenance")  # fmt: skip
        return [dict(zip(keys, row, strict=True)) for row in rows]

    # --- the resolved work -----------------------------------------------------------------

    def is_resolved(self) -> bool:
        return self.get_meta("resolution_hash") is not None

    def save_resolution(
        self, resolution_hash: str, studies: Iterable[StudyRow], references: Iterable[Reference]
    ) -> int:
        """Record what the manifest resolved to, in one transaction; return the item count.

        Items already present keep their state (done stays done); items no longer resolved
        become stale, so a refresh never mixes two cohorts.
        """
        wanted = {_key(ref) for ref in references}
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM studies")
            self._db.executemany(
                "INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (s.study_uid, s.query_set, s.patient_id, s.accession_number,
                     s.study_date, s.modalities)
                    for s in studies
                ],
            )  # fmt: skip
            existing = {
                (row[1], row[2], row[3]): row[0]
                for row in self._db.execute(
                    "SELECT item_id, study_uid, series_uid, instance_uid FROM items"
                )
            }
            stale = [item_id for key, item_id in existing.items() if key not in wanted]
            self._db.executemany(
                "UPDATE items SET state = ?, updated_at = ? WHERE item_id = ?",
                [(STALE, now(), item_id) for item_id in stale],
            )
            self._db.executemany(
                "UPDATE items SET state = ? WHERE item_id = ? AND state = ?",
                [(PENDING, existing[key], STALE) for key in wanted if key in existing],
            )
            self._db.executemany(
                "INSERT INTO items (study_uid, series_uid, instance_uid, updated_at) "
                "VALUES (?, ?, ?, ?)",
                [(*key, now()) for key in wanted if key not in existing],
            )
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('resolution_hash', ?)", (resolution_hash,)
            )
            self._db.execute("COMMIT")
        return len(wanted)

    def items(self, states: Iterable[str] | None = None) -> list[Item]:
        query = (
            "SELECT item_id, study_uid, series_uid, instance_uid, state, attempts, last_error "
            "FROM items"
        )
        params: tuple[str, ...] = ()
        if states is not None:
            chosen = tuple(states)
            query += f" WHERE state IN ({', '.join('?' * len(chosen))})"
            params = chosen
        with self._lock:
            rows = self._db.execute(query + " ORDER BY item_id", params).fetchall()
        return [
            Item(row[0], reference_of(row[1], row[2], row[3]), row[4], row[5], row[6])
            for row in rows
        ]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall()
            files = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files"
            ).fetchone()
        counts = {PENDING: 0, DONE: 0, FAILED: 0, STALE: 0}
        counts.update({state: count for state, count in rows})
        counts["files"], counts["bytes"] = files
        return counts

    def study_rows(self) -> list[StudyRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM studies ORDER BY study_uid").fetchall()
        return [StudyRow(*row) for row in rows]

    # --- progress of items -----------------------------------------------------------------

    def record_file(
        self, item_id: int, stored: StoredInstance, source: str, run_id: str | None = None
    ) -> None:
        """Record a file that is already renamed into place and fsynced."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO files (sop_instance_uid, item_id, study_uid, series_uid, "
                "path, size, sha256, transfer_syntax, sop_class_uid, source, stored_at, "
                "modality, patient_id, accession_number, study_date, run_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.sop_instance_uid, item_id, stored.study_uid, stored.series_uid,
                    stored.relative_path.as_posix(), stored.size, stored.sha256,
                    stored.transfer_syntax, stored.sop_class_uid, source, now(),
                    stored.modality, stored.patient_id, stored.accession_number,
                    stored.study_date, run_id,
                ),
            )  # fmt: skip

    def record_files(
        self, item_id: int, stored: list[StoredInstance], source: str, run_id: str | None = None
    ) -> None:
        """Record files of one item already renamed into place and durable."""
        self.record_files_of_items([(item_id, stored)], source, run_id)

    def record_files_of_items(
        self,
        batches: list[tuple[int, list[StoredInstance]]],
        source: str,
        run_id: str | None = None,
    ) -> None:
        """Record files already renamed into place and durable, in one transaction.

        One commit (one fsync of the WAL) for many files instead of one each: per-file
        commits cost more than a quarter of the download time of a study of small files.
        """
        at = now()
        rows = [
            (
                s.sop_instance_uid, item_id, s.study_uid, s.series_uid,
                s.relative_path.as_posix(), s.size, s.sha256, s.transfer_syntax,
                s.sop_class_uid, source, at, s.modality, s.patient_id, s.accession_number,
                s.study_date, run_id,
            )
            for item_id, stored in batches
            for s in stored
        ]  # fmt: skip
        if not rows:
            return
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR REPLACE INTO files (sop_instance_uid, item_id, study_uid, series_uid, "
                "path, size, sha256, transfer_syntax, sop_class_uid, source, stored_at, "
                "modality, patient_id, accession_number, study_date, run_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.execute("COMMIT")

    def mark_done(self, item_id: int) -> None:
        self._set_state(item_id, DONE, None, attempt=True)

    def mark_failed(self, item_id: int, reason: str) -> None:
        self._set_state(item_id, FAILED, reason, attempt=True)

    def mark_pending(self, item_id: int, reason: str | None = None) -> None:
        self._set_state(item_id, PENDING, reason, attempt=False)

    def _set_state(self, item_id: int, state: str, reason: str | None, *, attempt: bool) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE items SET state = ?, last_error = ?, updated_at = ?, "
                "attempts = attempts + ? WHERE item_id = ?",
                (state, reason, now(), 1 if attempt else 0, item_id),
            )

    def files(self, item_id: int | None = None) -> Iterator[dict[str, Any]]:
        query = "SELECT * FROM files"
        params: tuple[int, ...] = ()
        if item_id is not None:
            query += " WHERE item_id = ?"
            params = (item_id,)
        with self._lock:
            cursor = self._db.execute(query + " ORDER BY path", params)
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        for row in rows:
            yield dict(zip(names, row, strict=True))

    def reopen_item(self, item_id: int, sop_instance_uids: Iterable[str], reason: str) -> None:
        """Forget some files of an item and mark it pending, in one transaction (issue 13):
        a crash leaves both changes or neither, never forgotten files of a `done` item."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "DELETE FROM files WHERE sop_instance_uid = ?",
                [(uid,) for uid in sop_instance_uids],
            )
            self._db.execute(
                "UPDATE items SET state = ?, last_error = ?, updated_at = ? WHERE item_id = ?",
                (PENDING, reason, now(), item_id),
            )
            self._db.execute("COMMIT")

    def forget_files(self, sop_instance_uids: Iterable[str]) -> None:
        with self._lock:
            self._db.executemany(
                "DELETE FROM files WHERE sop_instance_uid = ?",
                [(uid,) for uid in sop_instance_uids],
            )
