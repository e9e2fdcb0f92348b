"""The Trolley: owns a searcher, a downloader and a storage, and is in control.

It resolves what the downloader needs: when the downloader says (MissingReferencesError) that
it can only fetch series or instances, the Trolley asks the searcher for those levels, only for
the objects that lack them, in background threads while other objects already download.
"""

from __future__ import annotations

import io
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import pydicom
from pydicom import Dataset

from trolley_etl.core.arrival import CheckedSink
from trolley_etl.core.backend import Downloader, MetadataSource, Searcher
from trolley_etl.core.constants import DEFAULT_LAYOUT
from trolley_etl.core.engine import execute
from trolley_etl.core.errors import (
    ConfigurationError,
    DownloadError,
    MissingReferencesError,
    NoMatchError,
    SeveralMatchesError,
    TrolleyError,
)
from trolley_etl.core.model import (
    Instance,
    InstanceReference,
    QueryLevel,
    Reference,
    Retrievable,
    Series,
    SeriesReference,
    Study,
    StudyReference,
    merge_studies,
)
from trolley_etl.core.query import FilterValue, Query
from trolley_etl.core.storage import StorageDir, StoredInstance

DEFAULT_WORKERS = 4


class Trolley:
    """Search with one backend, download with another, store to disk."""

    def __init__(
        self,
        downloader: Downloader,
        searcher: Searcher | None = None,
        storage: StorageDir | None = None,
        workers: int = DEFAULT_WORKERS,
    ) -> None:
        if workers < 1:
            raise ConfigurationError("workers must be at least 1")
        self.searcher = searcher
        self.downloader = downloader
        self.storage = storage
        self.workers = workers

    # --- search ------------------------------------------------------------------------------

    def _require_searcher(self) -> Searcher:
        if self.searcher is None:
            raise TrolleyError("this Trolley has no searcher")
        return self.searcher

    def find_studies(self, query: Query) -> list[Study]:
        """Every study matching `query`, as the searcher answers."""
        return self._require_searcher().search(query)

    def find_study(self, query: Query) -> Study:
        """The one study matching the query; an error naming the count otherwise."""
        studies = self.find_studies(query)
        if not studies:
            raise NoMatchError(f"expected exactly one study for {_describe(query)}, found 0")
        if len(studies) > 1:
            uids = ", ".join(s.uid for s in studies[:5]) + (", ..." if len(studies) > 5 else "")
            raise SeveralMatchesError(
                f"expected exactly one study for {_describe(query)}, found {len(studies)} ({uids})"
            )
        return studies[0]

    def find_study_by_id(self, study_uid: str, level: QueryLevel = QueryLevel.STUDY) -> Study:
        """The study with this UID, with its tree searched down to `level`."""
        return self.find_study(Query(query_level=level, StudyInstanceUID=study_uid))

    # --- expansion ---------------------------------------------------------------------------

    def ensure_level(self, objects: Sequence[Retrievable], level: QueryLevel) -> list[Retrievable]:
        """The same objects, each with references down to `level`.

        Objects that already reach the level are returned as they are; only the others are
        searched for (with the searcher, or the downloader's metadata when there is none).
        """
        return [self._expand(obj, level) for obj in objects]

    def _expand(self, obj: Retrievable, level: QueryLevel) -> Retrievable:
        if _reaches(obj, level):
            return obj
        if isinstance(obj, Study) and obj.series is not None:
            # The series are known (perhaps a selection of them): expand each, keep the selection.
            obj.series = [self._expand_series(s, level) for s in obj.series]
            return obj
        if isinstance(obj, (Study, StudyReference)):
            found = self._search_tree(StudyReference(_study_uid(obj)), level)
            if isinstance(obj, Study):
                obj.merge(found)
                return obj
            return found
        if isinstance(obj, (Series, SeriesReference)):
            series = obj if isinstance(obj, Series) else Series(obj.series_uid, obj.study_uid)
            return self._expand_series(series, level)
        raise MissingReferencesError(level, f"cannot expand {obj!r} to {level.value} level")

    def _expand_series(self, series: Series, level: QueryLevel) -> Series:
        if level is not QueryLevel.INSTANCE or series.instances is not None:
            return series
        found = self._search_tree(SeriesReference(series.study_uid, series.uid), level)
        for candidate in found.all_series():
            if candidate.uid == series.uid:
                series.merge(candidate)
        if series.instances is None:
            series.instances = []
        return series

    def _search_tree(self, ref: StudyReference | SeriesReference, level: QueryLevel) -> Study:
        if self.searcher is None:
            if isinstance(self.downloader, MetadataSource):
                return self.downloader.metadata_tree(ref)
            raise TrolleyError(
                f"the downloader needs {level.value}-level references and there is no searcher"
            )
        filters: dict[str, FilterValue] = {"StudyInstanceUID": ref.study_uid}
        if isinstance(ref, SeriesReference):
            filters["SeriesInstanceUID"] = ref.series_uid
        studies = merge_studies(self.searcher.search(Query(query_level=level, filters=filters)))
        matching = [s for s in studies if s.uid == ref.study_uid]
        if not matching:
            raise NoMatchError(f"the archive has no {level.value}s for {ref}")
        return matching[0]

    def plan(self, objects: Sequence[Retrievable]) -> list[Reference]:
        """The downloader's retrievals for objects, searching missing levels when it asks."""
        try:
            return self.downloader.plan(objects)
        except MissingReferencesError as missing:
            return self.downloader.plan(self.ensure_level(objects, missing.needed_level))

    # --- download ----------------------------------------------------------------------------

    def download(
        self,
        objects: Iterable[Retrievable] | Retrievable,
        output_dir: str | os.PathLike[str] | None = None,
        *,
        workers: int | None = None,
    ) -> list[StoredInstance]:
        """Fetch every instance under `objects` and store it; return what was stored.

        Objects are planned (and expanded when needed) in the background while earlier ones
        download, with at most `workers` retrievals at a time. If any retrieval fails the others
        still complete, then a DownloadError lists the failures.
        """
        storage = self._storage_for(output_dir)
        items = _as_list(objects)
        stored: list[StoredInstance] = []
        failures: list[tuple[object, BaseException]] = []
        lock = threading.Lock()
        sink = _RecordingSink(storage, stored, lock)
        workers = workers or self.workers

        with ThreadPoolExecutor(max_workers=min(2, workers), thread_name_prefix="plan") as planner:
            plans = {planner.submit(self.plan, [obj]): obj for obj in items}

            def planned() -> Iterator[Reference]:
                for done in as_completed(plans):
                    try:
                        refs = done.result()
                    except Exception as exc:
                        failures.append((plans[done], exc))
                        continue
                    yield from refs

            def finished(ref: Reference, error: BaseException | None) -> None:
                if error is not None:
                    failures.append((ref, error))

            # the runner's engine: bounded, fetching while the other objects are planned
            # every object is checked against the reference it was fetched for (CheckedSink)
            execute(
                planned(),
                lambda ref: self.downloader.fetch(ref, CheckedSink(sink, ref)),
                workers=workers,
                on_done=finished,
            )
        if failures:
            raise DownloadError(failures, stored)
        return stored

    def _storage_for(self, output_dir: str | os.PathLike[str] | None) -> StorageDir:
        if output_dir is None:
            if self.storage is None:
                raise TrolleyError("download needs an output_dir or a Trolley with a storage")
            return self.storage
        layout = self.storage.layout.template if self.storage else DEFAULT_LAYOUT
        file_format = getattr(self.downloader, "file_format", "dicom")  # metadata-only json
        deid = self.storage.deid if self.storage else None
        return StorageDir(output_dir, layout, deid, file_format=file_format)

    def fetch_all_datasets(self, objects: Iterable[Retrievable] | Retrievable) -> Iterator[Dataset]:
        """Yield each instance as a pydicom Dataset, as it arrives.

        Retrieval runs in a background thread and hands over datasets through a small bounded
        queue, so memory holds a few instances at most, whatever the study size.
        """
        items = _as_list(objects)
        handover: queue.Queue[object] = queue.Queue(maxsize=2)
        stop = threading.Event()
        sink = _DatasetSink(handover, stop)

        def produce() -> None:
            try:
                try:
                    for ref in self.plan(items):
                        self.downloader.fetch(ref, CheckedSink(sink, ref))
                    _put(handover, _END, stop)
                except _Stopped:
                    return
                except BaseException as exc:
                    _put(handover, exc, stop)
            except _Stopped:
                return  # the consumer went away; nobody is left to tell

        thread = threading.Thread(target=produce, name="fetch-datasets", daemon=True)
        thread.start()
        try:
            while True:
                item = handover.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            stop.set()
            thread.join(timeout=30)

    def close(self) -> None:
        """Close the searcher and the downloader."""
        if self.searcher is not None:
            self.searcher.close()
        self.downloader.close()

    def __enter__(self) -> Trolley:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


class _Stopped(Exception):
    """The consumer of fetch_all_datasets went away."""


def _put(handover: queue.Queue[object], item: object, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            handover.put(item, timeout=0.2)
            return
        except queue.Full:
            continue
    raise _Stopped()


class _DatasetWriter:
    def __init__(self, sink: _DatasetSink) -> None:
        self._sink = sink
        self._buffer = io.BytesIO()

    def write(self, chunk: bytes) -> None:
        if self._sink.stop.is_set():
            raise _Stopped()
        self._buffer.write(chunk)

    def commit(self) -> None:
        self._buffer.seek(0)
        if self._buffer.getbuffer()[:1].tobytes() == b"{":  # DICOM JSON of a metadata-only download
            dataset = Dataset.from_json(self._buffer.getvalue(), lambda *_: b"")
        else:
            dataset = pydicom.dcmread(self._buffer)
        _put(self._sink.handover, dataset, self._sink.stop)

    def abort(self) -> None:
        self._buffer = io.BytesIO()


class _DatasetSink:
    def __init__(self, handover: queue.Queue[object], stop: threading.Event) -> None:
        self.handover = handover
        self.stop = stop

    def open_instance(self) -> _DatasetWriter:
        return _DatasetWriter(self)


class _RecordingWriter:
    def __init__(self, sink: _RecordingSink) -> None:
        self._sink = sink
        self._staged = sink.storage.open_instance()

    def write(self, chunk: bytes) -> None:
        self._staged.write(chunk)

    def commit(self) -> None:
        self._staged.commit()
        if self._staged.result is not None:
            with self._sink.lock:
                self._sink.stored.append(self._staged.result)

    def abort(self) -> None:
        self._staged.abort()


class _RecordingSink:
    """Stores through a StorageDir and collects what was stored."""

    def __init__(self, storage: StorageDir, stored: list[StoredInstance], lock: threading.Lock):
        self.storage = storage
        self.stored = stored
        self.lock = lock

    def open_instance(self) -> _RecordingWriter:
        return _RecordingWriter(self)


def _as_list(objects: Iterable[Retrievable] | Retrievable) -> list[Retrievable]:
    if isinstance(objects, _SINGLE_OBJECTS):
        return [objects]
    return list(objects)


_SINGLE_OBJECTS = (Study, Series, Instance, StudyReference, SeriesReference, InstanceReference)


def _reaches(obj: Retrievable, level: QueryLevel) -> bool:
    """True when the object already holds references down to `level`."""
    try:
        obj.contained_references(level)
    except MissingReferencesError:
        return False
    return True


def _study_uid(obj: Study | StudyReference) -> str:
    return obj.uid if isinstance(obj, Study) else obj.study_uid


def _describe(query: Query) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in query.filters.items())
    return f"query ({shown})" if shown else "an empty query"
