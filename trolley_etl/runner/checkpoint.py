"""The checkpoint: what a manifest resolved to and what is durably on disk, in SQLite.

It lives in `storage.root/.trolley/checkpoint.sqlite`. SQLite in WAL mode with
`synchronous=FULL` makes each commit durable, so after a crash the checkpoint says exactly
what was recorded (a power cut may take back the latest records of files not yet synced, see
`_unsynced_commit`). Files are recorded only after they were renamed into place; an item is
marked done only after all its files are recorded. A crash between rename and record leaves a
file the checkpoint does not know: the rerun fetches the item again and the rename replaces
the file with identical bytes, so nothing is lost or duplicated. Files recorded by a run are
listed in `unsynced` (same transaction) until the batch sync that makes them durable; a rerun
re-hashes whatever is still listed (issue 17, `runner.committer`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import socket
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import Enum
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
CREATE TABLE IF NOT EXISTS unsynced (seq INTEGER PRIMARY KEY, sop_instance_uid TEXT NOT NULL);
"""
#: Columns added after the first release: created with ALTER TABLE when an older checkpoint
#: lacks them, so existing checkpoints stay usable (their old rows read as NULL).
ADDED_COLUMNS = {
    "runs": {"provenance": "TEXT", "pid": "INTEGER", "host": "TEXT"},
    # what the archive said a unit holds: a count, and the SOPInstanceUIDs where listed
    "items": {
        "expected_instances": "INTEGER",
        "expected_uids": "TEXT",
        "stored_instances": "INTEGER",
        "missing_uids": "TEXT",
        "extra_instances": "INTEGER",
    },
    "files": {
        "modality": "TEXT",
        "patient_id": "TEXT",
        "accession_number": "TEXT",
        "study_date": "TEXT",
        "run_id": "TEXT",
        "new_path": "TEXT",  # where a layout change moves the file (see runner.relayout)
    },
}


#: Stamped into a checkpoint (`PRAGMA user_version`) once it has every table and column
#: above; it changes whenever they do. A checkpoint carrying it opens without any DDL, and
#: one that does not is brought up to date in one transaction (one sync, not one per table).
SCHEMA_VERSION = zlib.crc32(repr((SCHEMA, ADDED_COLUMNS)).encode()) & 0x7FFFFFFF


class ItemState(str, Enum):
    """The state of a retrieval unit (one checkpoint item)."""

    PENDING = "pending"
    DONE = "done"  # stored, and what was stored matches what the archive said it holds
    INCOMPLETE = "incomplete"  # stored fewer instances than expected, after retries
    FAILED = "failed"
    STALE = "stale"  # no longer part of the resolved cohort

    def __str__(self) -> str:  # "done", not "ItemState.DONE", in messages and f-strings
        return self.value


class RunState(str, Enum):
    """How a run ended (or that it is still going)."""

    RUNNING = "running"
    COMPLETE = "complete"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    ABORTED = "aborted"  # its process died without saying how it ended

    def __str__(self) -> str:
        return self.value


#: The item states as plain strings (the names modules used before the enum).
PENDING, DONE, INCOMPLETE, FAILED, STALE = (s.value for s in ItemState)
#: Item states that a run still has work for.
TODO_STATES = (PENDING, FAILED, INCOMPLETE)


def state_dir(root: Path) -> Path:
    """The folder under a storage root that trolley-etl owns."""
    return root / STATE_DIR


def open_checkpoint(root: Path, *, read_only: bool = False) -> Checkpoint:
    """The checkpoint of a storage root (created if there is none, unless `read_only`).

    Runs whose process died while `running` are marked `aborted` on the way, by readers too
    where the checkpoint is writable; a read-only root is read as it is.
    """
    path = state_dir(root) / CHECKPOINT_NAME
    if read_only and os.access(path, os.W_OK) and os.access(path.parent, os.W_OK):
        read_only = False
    checkpoint = Checkpoint(path, read_only=read_only)
    if not read_only:
        checkpoint.mark_abandoned_runs()
    return checkpoint


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Expectation:
    """What the archive said a unit holds: a count, and the instance UIDs where listed.

    `count` None means unknown (only with `run.completeness: off`).
    """

    count: int | None = None
    uids: tuple[str, ...] | None = None

    @classmethod
    def of_uids(cls, uids: Iterable[str]) -> Expectation:
        listed = tuple(sorted(set(uids)))
        return cls(len(listed), listed)


@dataclass(frozen=True)
class Item:
    """One retrieval unit of the plan, its expectation and how far it got."""

    item_id: int
    reference: Reference
    state: ItemState  # a str enum: compares equal to "done", "pending", ...
    attempts: int
    last_error: str | None
    expected: Expectation = field(default_factory=Expectation)
    stored_instances: int | None = None
    missing_uids: tuple[str, ...] = ()
    extra_instances: int = 0


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


@dataclass(frozen=True)
class FileRecord:
    """One stored file as the checkpoint records it."""

    sop_instance_uid: str
    item_id: int
    study_uid: str
    series_uid: str
    path: str  # relative to the storage root, POSIX separators
    size: int
    sha256: str
    transfer_syntax: str | None = None
    sop_class_uid: str | None = None
    source: str | None = None
    stored_at: str = ""
    modality: str | None = None
    patient_id: str | None = None
    accession_number: str | None = None
    study_date: str | None = None
    run_id: str | None = None
    new_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # columns added by newer code

    def __getitem__(self, key: str) -> Any:
        """Read like the dict rows of earlier versions (`record["path"]`)."""
        if key in _FILE_FIELDS:
            return getattr(self, key)
        return self.extra[key]

    def get(self, key: str, default: Any = None) -> Any:
        if key in _FILE_FIELDS:
            return getattr(self, key)
        return self.extra.get(key, default)

    @classmethod
    def from_row(cls, names: list[str], row: tuple[Any, ...]) -> FileRecord:
        return cls.row_reader(names)(row)

    @classmethod
    def row_reader(cls, names: list[str]) -> Callable[[tuple[Any, ...]], FileRecord]:
        """Rows of `SELECT * FROM files` with these column names as records, built from
        positions worked out once (a dict per row was most of a finished rerun's time)."""
        column = {name: index for index, name in enumerate(names)}
        fields = [f.name for f in dataclasses.fields(cls)]
        picks: list[tuple[int | None, Any]] = [
            (column.get(f.name), f.default)  # a column an older checkpoint lacks: the default
            for f in dataclasses.fields(cls)
            if f.name != "extra"
        ]
        extra_at = fields.index("extra")
        others = [(index, name) for name, index in column.items() if name not in _FILE_FIELDS]

        def read(row: tuple[Any, ...]) -> FileRecord:
            values: list[Any] = [row[i] if i is not None else default for i, default in picks]
            values.insert(extra_at, {name: row[index] for index, name in others})
            return cls(*values)

        return read


@dataclass(frozen=True)
class RunRecord:
    """One run as the checkpoint records it; `summary` and `provenance` are JSON text."""

    run_id: str
    started_at: str
    finished_at: str | None
    status: str  # a RunState value
    manifest_hash: str
    summary: str | None
    provenance: str | None

    def __getitem__(self, key: str) -> Any:
        """Read like the dict rows of earlier versions (`run["status"]`)."""
        return getattr(self, key)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: File records read at a time when they are listed (`Checkpoint.files`).
FILE_PAGE = 2000


class Checkpoint:
    """One SQLite database per storage root. Safe to use from several threads."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._read_only = read_only
        if read_only:  # issue 13: status, report, verify on a read-only root
            self._db = connect_read_only(path)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            if self._db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._create_schema()
        except sqlite3.DatabaseError as exc:
            raise damaged_checkpoint_error(path, exc) from None

    def _create_schema(self) -> None:
        """Every table and column, and the stamp saying so, in one transaction."""
        try:  # the script's BEGIN opens the transaction (executescript only commits before)
            self._db.executescript("BEGIN IMMEDIATE;\n" + SCHEMA)
            self._add_missing_columns()
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

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
                "INSERT INTO runs (run_id, started_at, status, manifest_hash, provenance, pid, "
                "host) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    now(),
                    RunState.RUNNING.value,
                    manifest_hash,
                    json.dumps(provenance or {}, sort_keys=True),
                    os.getpid(),
                    socket.gethostname(),
                ),
            )

    def mark_abandoned_runs(self) -> list[str]:
        """Runs still `running` whose process is gone become `aborted`, with what they did.

        Only runs started on this host are judged (a pid means nothing elsewhere); a run
        with no pid (an older checkpoint) is aborted when another one has started since.
        """
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, pid, host FROM runs WHERE status = ? ORDER BY started_at",
                (RunState.RUNNING.value,),
            ).fetchall()
        here = socket.gethostname()
        aborted = []
        for index, (run_id, pid, host) in enumerate(rows):
            if pid is None:
                dead = index < len(rows) - 1
            else:
                dead = host == here and not _process_alive(int(pid))
            if dead:
                aborted.append(run_id)
        if aborted:
            summary = json.dumps(self.counts(), sort_keys=True)
            with self._lock:
                self._db.executemany(
                    "UPDATE runs SET status = ?, summary = COALESCE(summary, ?) "
                    "WHERE run_id = ? AND status = ?",
                    [
                        (RunState.ABORTED.value, summary, run_id, RunState.RUNNING.value)
                        for run_id in aborted
                    ],
                )
        return aborted

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

    def runs(self) -> list[RunRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, started_at, finished_at, status, manifest_hash, summary, "
                "provenance FROM runs ORDER BY started_at"
            ).fetchall()
        return [RunRecord(*row) for row in rows]

    # --- the resolved work -----------------------------------------------------------------

    def save_resolution(
        self,
        resolution_hash: str,
        studies: Iterable[StudyRow],
        references: Iterable[Reference],
        expectations: Mapping[Reference, Expectation] | None = None,
    ) -> int:
        """Record what the manifest resolved to, in one transaction; return the item count.

        Items already present keep their state (done stays done); items no longer resolved
        become stale, so a refresh never mixes two cohorts. Each item gets its expectation
        (what the archive said it holds), which decides later whether it is complete.
        """
        refs = list(references)
        wanted = {_key(ref) for ref in refs}
        expected: dict[tuple[str, str, str], Expectation] = {}
        for ref, exp in (expectations or {}).items():  # batches of one series add up
            expected[_key(ref)] = _union(expected.get(_key(ref)), exp)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM studies")
            self._db.executemany(
                "INSERT OR REPLACE INTO studies VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        s.study_uid,
                        s.query_set,
                        s.patient_id,
                        s.accession_number,
                        s.study_date,
                        s.modalities,
                    )
                    for s in studies
                ],
            )
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
            self._db.executemany(
                "UPDATE items SET expected_instances = ?, expected_uids = ? "
                "WHERE study_uid = ? AND series_uid = ? AND instance_uid = ?",
                [
                    (exp.count, None if exp.uids is None else json.dumps(list(exp.uids)), *key)
                    for key, exp in expected.items()
                    if key in wanted
                ],
            )
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('resolution_hash', ?)", (resolution_hash,)
            )
            self._db.execute("COMMIT")
        return len(wanted)

    def items(self, states: Iterable[str] | None = None) -> list[Item]:
        query = (
            "SELECT item_id, study_uid, series_uid, instance_uid, state, attempts, last_error, "
            "expected_instances, expected_uids, stored_instances, missing_uids, extra_instances "
            "FROM items"
        )
        params: tuple[str, ...] = ()
        if states is not None:
            chosen = tuple(states)
            query += f" WHERE state IN ({', '.join('?' * len(chosen))})"
            params = chosen
        with self._lock:
            rows = self._db.execute(query + " ORDER BY item_id", params).fetchall()
        return [_item(row) for row in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall()
            files = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files"
            ).fetchone()
        counts = {state.value: 0 for state in ItemState}
        counts.update({state: count for state, count in rows})
        counts["files"], counts["bytes"] = files
        return counts

    def totals_by_query_set(self) -> tuple[list[Any], list[Any]]:
        """Counted by SQLite, not in Python (`status` on 100,000 items, issue 17): per query
        set ("" for none) and state, the items and their stored instances; per query set,
        the recorded files and their bytes."""
        with self._lock:
            items = self._db.execute(
                "SELECT COALESCE(s.query_set, ''), i.state, COUNT(*), "
                "COALESCE(SUM(i.stored_instances), 0) "
                "FROM items i LEFT JOIN studies s ON s.study_uid = i.study_uid GROUP BY 1, 2"
            ).fetchall()
            files = self._db.execute(
                "SELECT COALESCE(s.query_set, ''), COUNT(*), COALESCE(SUM(f.size), 0) "
                "FROM files f LEFT JOIN studies s ON s.study_uid = f.study_uid GROUP BY 1"
            ).fetchall()
        return items, files

    def file_checksums(self) -> list[tuple[str, str, int]]:
        """(path, SHA-256, size) of every stored file: what the BagIt manifest lists, without
        building a record per file."""
        with self._lock:
            return self._db.execute("SELECT path, sha256, size FROM files").fetchall()

    def stored_totals(self) -> dict[str, int]:
        """Studies, series, instances and bytes recorded as stored, counted by SQLite."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(DISTINCT study_uid), COUNT(DISTINCT series_uid), COUNT(*), "
                "COALESCE(SUM(size), 0) FROM files"
            ).fetchone()
        return dict(zip(("studies", "series", "instances", "bytes"), row, strict=True))

    def study_rows(self) -> list[StudyRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM studies ORDER BY study_uid").fetchall()
        return [StudyRow(*row) for row in rows]

    # --- progress of items -----------------------------------------------------------------

    def record_file(
        self, item_id: int, stored: StoredInstance, source: str, run_id: str | None = None
    ) -> None:
        """Record a file that is already renamed into place and fsynced."""
        self.record_files_of_items([(item_id, [stored])], source, run_id)

    def record_files_of_items(
        self,
        batches: list[tuple[int, list[StoredInstance]]],
        source: str,
        run_id: str | None = None,
        *,
        durable: bool = True,
    ) -> int:
        """Record files already renamed into place, in one transaction.

        One commit (one fsync of the WAL) for many files instead of one each: per-file
        commits cost more than a quarter of the download time of a study of small files.
        With `durable=False` the files are not yet known to be on stable storage: they are
        also listed as unsynced, in the same transaction, until `mark_durable` (a rerun
        re-hashes what is still listed, see `runner.committer`). Returns the last unsynced
        sequence number (0 if none).
        """
        at = now()
        rows = [
            (
                s.sop_instance_uid,
                item_id,
                s.study_uid,
                s.series_uid,
                s.relative_path.as_posix(),
                s.size,
                s.sha256,
                s.transfer_syntax,
                s.sop_class_uid,
                source,
                at,
                s.modality,
                s.patient_id,
                s.accession_number,
                s.study_date,
                run_id,
            )
            for item_id, stored in batches
            for s in stored
        ]
        if not rows:
            return 0
        last = 0
        with self._lock, self._unsynced_commit(not durable), self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR REPLACE INTO files (sop_instance_uid, item_id, study_uid, series_uid, "
                "path, size, sha256, transfer_syntax, sop_class_uid, source, stored_at, "
                "modality, patient_id, accession_number, study_date, run_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            if not durable:
                self._db.executemany(
                    "INSERT INTO unsynced (sop_instance_uid) VALUES (?)", [(r[0],) for r in rows]
                )
                last = self._db.execute("SELECT max(seq) FROM unsynced").fetchone()[0] or 0
            self._db.execute("COMMIT")
        return last

    # --- durability by batch (issue 17) ------------------------------------------------------

    @contextlib.contextmanager
    def _unsynced_commit(self, unsynced: bool) -> Iterator[None]:
        """Commit the records of files not yet synced without an fsync of their own.

        They are listed as unsynced, and the batch sync (`syncfs` of the checkpoint's file
        system as well as the output's) makes them durable together with the files. An fsync
        of the log per batch instead forced a journal commit of the file system every few
        files, which with ext4's ordered data mode writes out the files' data as well: the
        per-file sync again, by another way. A power cut can take back the latest of these
        commits, never leave the checkpoint inconsistent (SQLite's write-ahead log keeps a
        prefix of the commits); the files they named are then unknown, and fetched again.
        """
        if not unsynced:
            yield
            return
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def mark_durable(self, upto: int) -> None:
        """Files recorded up to unsynced sequence number `upto` are now on stable storage."""
        with self._lock:
            self._db.execute("DELETE FROM unsynced WHERE seq <= ?", (upto,))

    def unsynced_files(self) -> list[FileRecord]:
        """Recorded files not yet known to be on stable storage (a crash or power cut came
        before their sync): what a rerun must re-hash."""
        with self._lock:
            cursor = self._db.execute(
                "SELECT * FROM files WHERE sop_instance_uid IN "
                "(SELECT sop_instance_uid FROM unsynced) ORDER BY item_id, path"
            )
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        read = FileRecord.row_reader(names)
        return [read(row) for row in rows]

    def has_unsynced(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM unsynced LIMIT 1").fetchone() is not None

    def settle_unsynced(self, lost: Mapping[int, list[str]], reason: str) -> None:
        """After a re-hash: forget the `lost` files (by item), mark their items pending, and
        clear the unsynced list, in one transaction (the rest was synced by the caller)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for item_id, uids in lost.items():
                self._db.executemany(
                    "DELETE FROM files WHERE sop_instance_uid = ?", [(uid,) for uid in uids]
                )
                self._db.execute(
                    "UPDATE items SET state = ?, last_error = ?, updated_at = ? WHERE item_id = ?",
                    (PENDING, reason, now(), item_id),
                )
            self._db.execute("DELETE FROM unsynced")
            self._db.execute("COMMIT")

    def mark_done(self, item_id: int, stored: int | None = None, extra: int = 0) -> None:
        self._set_state(item_id, DONE, None, attempt=True)
        self._set_completeness(item_id, stored, (), extra)

    def mark_incomplete(
        self, item_id: int, stored: int, missing: Iterable[str], reason: str
    ) -> None:
        """Fewer instances stored than the archive said the unit holds."""
        self._set_state(item_id, INCOMPLETE, reason, attempt=True)
        self._set_completeness(item_id, stored, tuple(missing), 0)

    def _set_completeness(
        self, item_id: int, stored: int | None, missing: tuple[str, ...], extra: int
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE items SET stored_instances = ?, missing_uids = ?, extra_instances = ? "
                "WHERE item_id = ?",
                (stored, json.dumps(list(missing)) if missing else None, extra, item_id),
            )

    def set_expectation(self, item_id: int, expectation: Expectation) -> None:
        """Give a unit its expectation after the fact (units of an older checkpoint)."""
        uids = None if expectation.uids is None else json.dumps(list(expectation.uids))
        with self._lock:
            self._db.execute(
                "UPDATE items SET expected_instances = ?, expected_uids = ? WHERE item_id = ?",
                (expectation.count, uids, item_id),
            )

    def stored_uids(self, item_id: int) -> set[str]:
        """SOPInstanceUIDs recorded as stored for one item."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid FROM files WHERE item_id = ?", (item_id,)
            ).fetchall()
        return {row[0] for row in rows}

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

    def files(self, item_id: int | None = None) -> Iterator[FileRecord]:
        """Every recorded file (of one item), in path order."""
        query = "SELECT * FROM files"
        params: tuple[int, ...] = ()
        if item_id is not None:
            query += " WHERE item_id = ?"
            params = (item_id,)
        if self._read_only:  # one connection, shared: read it all at once
            with self._lock:
                cursor = self._db.execute(query + " ORDER BY path", params)
                read = FileRecord.row_reader([d[0] for d in cursor.description])
                rows = cursor.fetchall()
            yield from map(read, rows)
            return
        # a connection of its own, read page by page: memory does not grow with the root
        # (the records of every file at once were most of the peak at the end of a run)
        reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            reader.execute("PRAGMA busy_timeout=10000")
            cursor = reader.execute(query + " ORDER BY path", params)
            read = FileRecord.row_reader([d[0] for d in cursor.description])
            while page := cursor.fetchmany(FILE_PAGE):
                yield from map(read, page)
        finally:
            reader.close()

    def file_paths(self) -> dict[str, str]:
        """SOPInstanceUID -> recorded path of every stored file."""
        with self._lock:
            rows = self._db.execute("SELECT sop_instance_uid, path FROM files").fetchall()
        return dict(rows)

    def plan_moves(self, new_paths: Mapping[str, str]) -> None:
        """Record, in one transaction, where each file goes under a new layout."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE files SET new_path = ? WHERE sop_instance_uid = ?",
                [(path, sop) for sop, path in new_paths.items()],
            )
            self._db.execute("COMMIT")

    def planned_moves(self) -> list[tuple[str, str, str]]:
        """(SOPInstanceUID, recorded path, new path) of moves not finished yet."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, path, new_path FROM files WHERE new_path IS NOT NULL "
                "ORDER BY path"
            ).fetchall()
        return [(row[0], row[1], row[2]) for row in rows]

    def finish_moves(self, moved: Iterable[tuple[str, str]]) -> None:
        """The files are at their new paths: record them there."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE files SET path = ?, new_path = NULL WHERE sop_instance_uid = ?",
                [(path, sop) for sop, path in moved],
            )
            self._db.execute("COMMIT")

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


_FILE_FIELDS = frozenset(f for f in FileRecord.__dataclass_fields__ if f != "extra")


def _item(row: tuple[Any, ...]) -> Item:
    uids = json.loads(row[8]) if row[8] else None
    return Item(
        row[0],
        reference_of(row[1], row[2], row[3]),
        ItemState(row[4]),
        row[5],
        row[6],
        expected=Expectation(row[7], None if uids is None else tuple(uids)),
        stored_instances=row[9],
        missing_uids=tuple(json.loads(row[10])) if row[10] else (),
        extra_instances=row[11] or 0,
    )


def _union(known: Expectation | None, more: Expectation) -> Expectation:
    if known is not None and known.uids is not None and more.uids is not None:
        return Expectation.of_uids([*known.uids, *more.uids])
    return more


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
