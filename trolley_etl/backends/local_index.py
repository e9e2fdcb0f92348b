"""A small SQLite index of the DICOM files under a folder, refreshed incrementally.

Each file is remembered with its size and modification time, so a refresh re-reads only files
that are new or changed (and forgets deleted ones). Files that are not DICOM Part 10 objects
(text files, thumbnails, a DICOMDIR) are remembered too, as non-instances, so they are not
opened again. Headers are read without pixel data and stored as DICOM JSON.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

#: Values longer than this are not indexed (they are never useful as search attributes).
MAX_INDEXED_VALUE = 1024
_SKIPPED_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"})
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY,
    mtime_ns INTEGER NOT NULL,
    size INTEGER NOT NULL,
    study_uid TEXT,
    series_uid TEXT,
    sop_uid TEXT,
    modality TEXT,
    header TEXT            -- DICOM JSON of the indexed attributes; NULL: not an instance
);
CREATE INDEX IF NOT EXISTS files_study ON files (study_uid);
CREATE INDEX IF NOT EXISTS files_series ON files (series_uid);
CREATE INDEX IF NOT EXISTS files_sop ON files (sop_uid);
"""


@dataclass(frozen=True)
class RefreshStats:
    """What a refresh did."""

    added: int
    updated: int
    removed: int
    unchanged: int
    not_dicom: int


@dataclass(frozen=True)
class IndexedFile:
    path: Path
    size: int
    study_uid: str
    series_uid: str
    sop_uid: str
    header: Dataset


class FolderIndex:
    """The index of one folder tree, stored in `index_path`. Safe to use from several threads
    (each operation opens its own connection)."""

    def __init__(self, root: Path, index_path: Path) -> None:
        self.root = root
        self.index_path = index_path
        with self._connect() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.index_path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            with db:
                yield db
        finally:
            db.close()

    def refresh(self) -> RefreshStats:
        """Bring the index in line with the folder: read new and changed files only."""
        with self._connect() as db:
            known = {
                row[0]: (row[1], row[2])
                for row in db.execute("SELECT path, mtime_ns, size FROM files")
            }
        added = updated = unchanged = not_dicom = 0
        seen: set[str] = set()
        pending: list[tuple[Any, ...]] = []
        for path in self._walk():
            try:
                stat = path.stat()
            except OSError:
                continue  # vanished while walking
            key = str(path)
            seen.add(key)
            if known.get(key) == (stat.st_mtime_ns, stat.st_size):
                unchanged += 1
                continue
            row = _read(path, stat.st_mtime_ns, stat.st_size)
            not_dicom += row[-1] is None
            if key in known:
                updated += 1
            else:
                added += 1
            pending.append(row)
        removed = [(p,) for p in known if p not in seen]
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", pending)
            db.executemany("DELETE FROM files WHERE path = ?", removed)
        return RefreshStats(added, updated, len(removed), unchanged, not_dicom)

    def _walk(self) -> Iterator[Path]:
        index_files = {self.index_path.name, f"{self.index_path.name}-wal"}
        index_files.add(f"{self.index_path.name}-shm")
        for folder, dirs, files in os.walk(self.root):  # symlinks to folders are not followed
            dirs[:] = sorted(d for d in dirs if d != ".trolley")
            for name in sorted(files):
                path = Path(folder) / name
                if name in index_files and path.parent == self.index_path.parent:
                    continue
                if not path.is_symlink():
                    yield path

    def files(
        self,
        *,
        study_uids: tuple[str, ...] = (),
        series_uids: tuple[str, ...] = (),
        sop_uids: tuple[str, ...] = (),
    ) -> Iterator[IndexedFile]:
        """Indexed instances, narrowed by UIDs (any of each tuple), one per SOP Instance UID."""
        sql = "SELECT path, size, study_uid, series_uid, sop_uid, header FROM files"
        where, args = ["header IS NOT NULL"], list[str]()
        for column, values in (
            ("study_uid", study_uids),
            ("series_uid", series_uids),
            ("sop_uid", sop_uids),
        ):
            if values:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        sql += " WHERE " + " AND ".join(where) + " ORDER BY path"
        with self._connect() as db:
            rows = db.execute(sql, args).fetchall()
        seen: set[str] = set()
        for path, size, study_uid, series_uid, sop_uid, header in rows:
            if sop_uid in seen:
                continue  # the same instance stored twice: the first path wins
            seen.add(sop_uid)
            yield IndexedFile(
                Path(path), size, study_uid, series_uid, sop_uid, Dataset.from_json(header)
            )

    def study_summaries(self) -> dict[str, tuple[list[str], int, int]]:
        """Per study: its modalities, number of series and number of instances."""
        sql = (
            "SELECT study_uid, group_concat(DISTINCT modality), count(DISTINCT series_uid), "
            "count(DISTINCT sop_uid) FROM files WHERE header IS NOT NULL GROUP BY study_uid"
        )
        with self._connect() as db:
            return {
                study: (sorted(m for m in (modalities or "").split(",") if m), series, count)
                for study, modalities, series, count in db.execute(sql)
            }

    def series_sizes(self) -> dict[str, int]:
        sql = (
            "SELECT series_uid, count(DISTINCT sop_uid) FROM files "
            "WHERE header IS NOT NULL GROUP BY series_uid"
        )
        with self._connect() as db:
            return dict(db.execute(sql).fetchall())


def _read(path: Path, mtime_ns: int, size: int) -> tuple[Any, ...]:
    """The index row of one file; header None when it is not a DICOM instance."""
    empty = (str(path), mtime_ns, size, None, None, None, None, None)
    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, defer_size=MAX_INDEXED_VALUE)
    except (InvalidDicomError, EOFError, ValueError, OSError, TypeError, KeyError):
        return empty
    uids = [str(dataset.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID")]
    sop_uid = str(dataset.get("SOPInstanceUID", ""))
    if not all(uids) or not sop_uid:
        return empty  # a DICOMDIR or another file that is not an instance of a study
    header = Dataset()
    for element in dataset:
        if element.VR in _SKIPPED_VRS or element.tag.is_private or element.tag.group == 0x7FE0:
            continue
        try:
            value = element.value
        except (ValueError, OSError, TypeError):
            continue
        if value is not None and len(str(value)) > MAX_INDEXED_VALUE:
            continue
        header.add(element)
    try:
        text = json.dumps(header.to_json_dict(), ensure_ascii=False)
    except (ValueError, TypeError):
        return empty
    modality = str(dataset.get("Modality", ""))
    return (str(path), mtime_ns, size, uids[0], uids[1], sop_uid, modality, text)
