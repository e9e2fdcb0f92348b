"""A folder of DICOM files, in any layout, as a searcher and a downloader.

Researchers often start from a disk or a share that someone filled by hand: nested folders
with arbitrary names, copies of the same file, text notes and thumbnails in between, with or
without a DICOMDIR. LocalFolder indexes such a tree (trolley_etl.backends.local_index), answers
the same Query as an archive would (DICOM matching, in Python), and "downloads" by streaming
the original bytes into the storage, so a Trolley can re-organise the folder into the standard
layout, byte for byte.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

from pydicom import Dataset

from trolley_etl.backends.local_index import FolderIndex, IndexedFile, RefreshStats
from trolley_etl.backends.matching import matches
from trolley_etl.core.backend import Downloader, InstanceSink, Searcher
from trolley_etl.core.errors import ObjectNotFoundError, StorageError
from trolley_etl.core.model import (
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    InstanceReference,
    QueryLevel,
    Reference,
    SeriesReference,
    Study,
    tree_from_rows,
)
from trolley_etl.core.query import Query

#: Bytes read from a file at a time when copying it into the sink.
CHUNK_SIZE = 1 << 20
INDEX_NAME = ".trolley-index.sqlite"
_UID_FILTERS = {
    "StudyInstanceUID": "study_uids",
    "SeriesInstanceUID": "series_uids",
    "SOPInstanceUID": "sop_uids",
}


class LocalFolder(Searcher, Downloader):
    """Search and fetch the DICOM files under `path`.

    The index lives in `index_path` (default: `path/.trolley-index.sqlite`; give another
    place for a read-only folder). It is refreshed before the first search or fetch, reading
    only new or changed files; call `refresh()` to pick up later changes.
    """

    retrieval_level = None  # studies, series and instances alike

    def __init__(
        self, path: str | os.PathLike[str], *, index_path: str | os.PathLike[str] | None = None
    ) -> None:
        self.root = Path(path).absolute()
        if not self.root.is_dir():
            raise ObjectNotFoundError(f"{self.root} is not a folder", url=str(self.root))
        self.index = FolderIndex(
            self.root, Path(index_path).absolute() if index_path else self.root / INDEX_NAME
        )
        self._fresh = False
        self._lock = threading.Lock()

    def refresh(self) -> RefreshStats:
        """Re-index new, changed and deleted files; return what changed."""
        with self._lock:
            stats = self.index.refresh()
            self._fresh = True
            return stats

    def _ensure_indexed(self) -> None:
        with self._lock:
            if not self._fresh:
                self.index.refresh()
                self._fresh = True

    # --- Searcher ------------------------------------------------------------------------------

    def search(self, query: Query) -> list[Study]:
        """The indexed studies matching `query`."""
        self._ensure_indexed()
        narrow = {
            _UID_FILTERS[k]: (v if isinstance(v, tuple) else (v,))
            for k, v in query.filters.items()
            if k in _UID_FILTERS and v != ""
        }
        studies = self.index.study_summaries()
        series_sizes = self.index.series_sizes()
        rows: dict[tuple[str, ...], Dataset] = {}
        for indexed in self.index.files(**narrow):
            row = _with_summaries(indexed, studies, series_sizes)
            if not matches(row, query.filters):
                continue
            key = _key(indexed, query.query_level)
            if key not in rows:
                rows[key] = _reduce(row, query.query_level, query.include_fields)
        selected = list(rows.values())[query.offset :]
        if query.limit is not None:
            selected = selected[: query.limit]
        return tree_from_rows(selected, query.query_level)

    # --- Downloader ----------------------------------------------------------------------------

    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        """Copy the files under `reference` into `sink`; the count."""
        self._ensure_indexed()
        series = (
            (reference.series_uid,)
            if isinstance(reference, (SeriesReference, InstanceReference))
            else ()
        )
        sops = (reference.instance_uid,) if isinstance(reference, InstanceReference) else ()
        files = list(
            self.index.files(study_uids=(reference.study_uid,), series_uids=series, sop_uids=sops)
        )
        if not files:
            raise ObjectNotFoundError(f"{self.root}: no files for {reference}", url=str(self.root))
        for indexed in files:
            _copy_into(indexed, sink)
        return len(files)

    def close(self) -> None:
        """Nothing stays open: every index operation uses its own connection."""


def _with_summaries(
    indexed: IndexedFile,
    studies: dict[str, tuple[list[str], int, int]],
    series_sizes: dict[str, int],
) -> Dataset:
    """The header plus the attributes an archive computes (ModalitiesInStudy, counts)."""
    row = indexed.header
    modalities, series_count, instance_count = studies.get(indexed.study_uid, ([], 0, 0))
    if modalities:
        row.ModalitiesInStudy = modalities
    row.NumberOfStudyRelatedSeries = series_count
    row.NumberOfStudyRelatedInstances = instance_count
    row.NumberOfSeriesRelatedInstances = series_sizes.get(indexed.series_uid, 0)
    return row


def _key(indexed: IndexedFile, level: QueryLevel) -> tuple[str, ...]:
    if level is QueryLevel.STUDY:
        return (indexed.study_uid,)
    if level is QueryLevel.SERIES:
        return (indexed.study_uid, indexed.series_uid)
    return (indexed.study_uid, indexed.series_uid, indexed.sop_uid)


def _reduce(row: Dataset, level: QueryLevel, include: Iterable[str]) -> Dataset:
    """Only the attributes that describe an object at `level` (plus those asked for)."""
    if level is QueryLevel.INSTANCE:
        return row
    keep = set(STUDY_KEYWORDS) | set(include)
    if level is QueryLevel.SERIES:
        keep |= SERIES_KEYWORDS
    reduced = Dataset()
    for element in row:
        if element.keyword in keep:
            reduced[element.tag] = element
    return reduced


def _copy_into(indexed: IndexedFile, sink: InstanceSink) -> None:
    """Stream one file's bytes, unchanged, into the sink."""
    writer = sink.open_instance()
    try:
        with open(indexed.path, "rb") as source:
            while chunk := source.read(CHUNK_SIZE):
                writer.write(chunk)
    except OSError as exc:
        writer.abort()
        raise StorageError(f"cannot read {indexed.path}: {exc.strerror or exc}") from None
    except BaseException:
        writer.abort()
        raise
    writer.commit()
