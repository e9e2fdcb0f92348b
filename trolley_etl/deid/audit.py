"""What de-identification did, kept in the checkpoint database in tables of its own.

`deid_files`: per stored file, the SHA-256 of the instance as received and of the
de-identified file written (the checkpoint's `files` table keeps working with source UIDs).
`deid_quarantine`: instances held back by the burned-in gate, with the reason.
`deid_runs`: per run, the profile, options, secret fingerprint and how many attributes were
removed, replaced or kept, by keyword. No value of any attribute is ever stored here.
This module reads no DICOM, so reports can be built without pydicom.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from trolley_etl.runner.sqlite_safety import connect_read_only

SCHEMA = """
CREATE TABLE IF NOT EXISTS deid_files (
    sop_instance_uid TEXT PRIMARY KEY, deid_sop_instance_uid TEXT NOT NULL,
    source_sha256 TEXT NOT NULL, deid_sha256 TEXT NOT NULL, run_id TEXT, at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deid_quarantine (
    sop_instance_uid TEXT PRIMARY KEY, study_uid TEXT, series_uid TEXT, sop_class_uid TEXT,
    reason TEXT NOT NULL, source_sha256 TEXT, run_id TEXT, at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS deid_runs (
    run_id TEXT PRIMARY KEY, settings TEXT NOT NULL, counts TEXT NOT NULL, at TEXT NOT NULL
);
"""
SETTINGS_KEY = "deid_settings"


class AuditLog:
    """Writes the tables above through its own connection to the checkpoint database."""

    def __init__(self, database: Path, run_id: str) -> None:
        self.run_id = run_id
        self._lock = threading.Lock()
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)

    def file(self, source_uid: str, deid_uid: str, source_sha: str, deid_sha: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO deid_files VALUES (?, ?, ?, ?, ?, datetime('now'))",
                (source_uid, deid_uid, source_sha, deid_sha, self.run_id),
            )

    def quarantine(self, uids: tuple[str, str, str, str], reason: str, source_sha: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO deid_quarantine VALUES "
                "(?, ?, ?, ?, ?, ?, ?, datetime('now'))",
                (*uids, reason, source_sha, self.run_id),
            )

    def run(self, settings: dict[str, Any], counts: Counter[tuple[str, str]]) -> None:
        by_outcome: dict[str, dict[str, int]] = {}
        for (outcome, keyword), number in sorted(counts.items()):
            by_outcome.setdefault(outcome, {})[keyword] = number
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO deid_runs VALUES (?, ?, ?, datetime('now'))",
                (
                    self.run_id,
                    json.dumps(settings, sort_keys=True),
                    json.dumps(by_outcome, sort_keys=True),
                ),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def report_section(database: Path) -> dict[str, Any] | None:
    """The `deid` section of the audit report; None when no run de-identified anything."""
    if not database.exists():
        return None
    db = connect_read_only(database)  # never writes: works on a read-only root too
    try:
        if "deid_runs" not in _tables(db):
            return None
        runs = [
            {"run_id": run_id, **json.loads(settings), "attributes": json.loads(counts)}
            for run_id, settings, counts in db.execute(
                "SELECT run_id, settings, counts FROM deid_runs ORDER BY run_id"
            )
        ]
        keys = ("sop_instance_uid", "study_uid", "series_uid", "sop_class_uid", "reason", "run_id")
        quarantined = [
            dict(zip(keys, row, strict=True))
            for row in db.execute(
                "SELECT sop_instance_uid, study_uid, series_uid, sop_class_uid, reason, run_id "
                "FROM deid_quarantine ORDER BY study_uid, series_uid, sop_instance_uid"
            )
        ]
        files = db.execute("SELECT COUNT(*) FROM deid_files").fetchone()[0]
    finally:
        db.close()
    return {"runs": runs, "files": files, "quarantined": quarantined}


def file_hashes(database: Path) -> dict[str, tuple[str, str]]:
    """Source SOP Instance UID -> (source SHA-256, de-identified SHA-256)."""
    if not database.exists():
        return {}
    db = connect_read_only(database)  # never writes: works on a read-only root too
    try:
        if "deid_files" not in _tables(db):
            return {}
        rows = db.execute("SELECT sop_instance_uid, source_sha256, deid_sha256 FROM deid_files")
        return {uid: (source, deid) for uid, source, deid in rows}
    finally:
        db.close()


def quarantined_in(database: Path, study_uid: str, series_uid: str = "") -> set[str]:
    """Source SOP Instance UIDs of one study (or series) that the burned-in gate held back:
    they count towards the unit's expected instances, as stored ones do."""
    if not database.exists():
        return set()
    db = connect_read_only(database)  # never writes: works on a read-only root too
    try:
        if "deid_quarantine" not in _tables(db):
            return set()
        query = "SELECT sop_instance_uid FROM deid_quarantine WHERE study_uid = ?"
        params: tuple[str, ...] = (study_uid,)
        if series_uid:
            query += " AND series_uid = ?"
            params += (series_uid,)
        return {row[0] for row in db.execute(query, params)}
    finally:
        db.close()


def quarantined_uids(database: Path) -> set[str]:
    """Source SOP Instance UIDs the burned-in gate held back: received, deliberately not
    stored (for completeness accounting: expected = stored + quarantined)."""
    if not database.exists():
        return set()
    db = connect_read_only(database)  # never writes: works on a read-only root too
    try:
        if "deid_quarantine" not in _tables(db):
            return set()
        return {row[0] for row in db.execute("SELECT sop_instance_uid FROM deid_quarantine")}
    finally:
        db.close()
