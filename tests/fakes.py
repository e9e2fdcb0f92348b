"""In-memory Searcher and Downloader over generated instances, for fast runner tests.

`FakeArchive` holds real DICOM Part 10 objects (from `dicomgen`) and answers searches the way
an archive does (rows with NumberOfStudyRelatedInstances / NumberOfSeriesRelatedInstances,
unless told not to). Its downloader can be told to lose instances, to deliver instances the
search did not list (archive drift), or to fail a number of times first: the behaviours
the runner must notice, in milliseconds instead of a real server's seconds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pydicom
from pydicom import Dataset

from trolley_etl.backends.matching import matches
from trolley_etl.core.backend import Downloader, InstanceSink, Searcher, write_instance
from trolley_etl.core.errors import ConnectionFailedError
from trolley_etl.core.model import (
    InstanceReference,
    QueryLevel,
    Reference,
    Retrievable,
    SeriesReference,
    Study,
    contained_references,
    tree_from_rows,
)
from trolley_etl.core.query import Query
from trolley_etl.testing.dicomgen import GeneratedInstance

HEADER_KEYWORDS = (
    "PatientID", "AccessionNumber", "StudyDate", "Modality", "SeriesDescription",
)  # fmt: skip


@dataclass
class FakeArchive:
    """What the fake archive holds, and how its two backends misbehave."""

    instances: list[GeneratedInstance]
    counts_in_answers: bool = True  # False: searches give no NumberOf...RelatedInstances
    lose: set[str] = field(default_factory=set)  # SOPInstanceUIDs the downloader never sends
    unlisted: set[str] = field(default_factory=set)  # held and sent, never found by search
    fail_first: int = 0  # fetches that fail (retryably) before any succeeds
    instance_level: bool = False  # the downloader retrieves named instances (like RAD-69)
    searches: list[Query] = field(default_factory=list)
    fetches: list[Reference] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def searcher(self) -> FakeSearcher:
        return FakeSearcher(self)

    def downloader(self) -> FakeDownloader:
        return FakeDownloader(self)

    def backends(self, manifest: object) -> tuple[Searcher, Downloader]:
        """A `Runner(backends=...)` factory."""
        return self.searcher(), self.downloader()

    def listed(self) -> list[GeneratedInstance]:
        return [i for i in self.instances if i.sop_uid not in self.unlisted]


def _header(instance: GeneratedInstance) -> Dataset:
    import io

    ds = pydicom.dcmread(io.BytesIO(instance.data), stop_before_pixels=True)
    row = Dataset()
    for keyword in HEADER_KEYWORDS:
        if keyword in ds:
            setattr(row, keyword, ds.data_element(keyword).value)
    row.StudyInstanceUID = instance.study_uid
    row.SeriesInstanceUID = instance.series_uid
    row.SOPInstanceUID = instance.sop_uid
    return row


class FakeSearcher(Searcher):
    def __init__(self, archive: FakeArchive) -> None:
        self.archive = archive
        self._headers = {i.sop_uid: _header(i) for i in archive.instances}

    def search(self, query: Query) -> list[Study]:
        with self.archive._lock:
            self.archive.searches.append(query)
        listed = self.archive.listed()
        hits = [i for i in listed if matches(self._headers[i.sop_uid], dict(query.filters))]
        rows: dict[tuple[str, ...], Dataset] = {}
        for instance in hits:
            key = _key(instance, query.query_level)
            if key not in rows:
                rows[key] = self._row(instance, query.query_level, listed)
        return tree_from_rows(list(rows.values()), query.query_level)

    def _row(self, instance: GeneratedInstance, level: QueryLevel,
             listed: list[GeneratedInstance]) -> Dataset:  # fmt: skip
        row = Dataset()
        row.update(self._headers[instance.sop_uid])
        if level is not QueryLevel.INSTANCE:
            del row.SOPInstanceUID
        if level is QueryLevel.STUDY:
            del row.SeriesInstanceUID
        if self.archive.counts_in_answers:
            in_study = [i for i in listed if i.study_uid == instance.study_uid]
            row.NumberOfStudyRelatedInstances = len(in_study)
            if level is not QueryLevel.STUDY:
                in_series = [i for i in in_study if i.series_uid == instance.series_uid]
                row.NumberOfSeriesRelatedInstances = len(in_series)
        return row


def _key(instance: GeneratedInstance, level: QueryLevel) -> tuple[str, ...]:
    uids = (instance.study_uid, instance.series_uid, instance.sop_uid)
    return uids[: level.depth + 1]


@dataclass(frozen=True)
class SeriesBatch(SeriesReference):
    """Instances of one series fetched in one request (as RAD-69 batches them)."""

    instance_uids: tuple[str, ...] = ()

    def contained_references(self, max_level: QueryLevel) -> list[Reference]:
        if max_level is QueryLevel.INSTANCE and self.instance_uids:
            return [InstanceReference(self.study_uid, self.series_uid, u)
                    for u in self.instance_uids]  # fmt: skip
        return super().contained_references(max_level)


class FakeDownloader(Downloader):
    retrieval_level = None

    def __init__(self, archive: FakeArchive) -> None:
        self.archive = archive
        if archive.instance_level:
            self.retrieval_level = QueryLevel.INSTANCE

    def plan(self, objects: Sequence[Retrievable]) -> list[Reference]:
        """Instance-level: one batch per series, like RAD-69."""
        if not self.archive.instance_level:
            return super().plan(objects)
        batches: dict[tuple[str, str], list[str]] = {}
        for ref in contained_references(objects, QueryLevel.INSTANCE):
            for inner in ref.contained_references(QueryLevel.INSTANCE):
                if isinstance(inner, InstanceReference):
                    key = (inner.study_uid, inner.series_uid)
                    batches.setdefault(key, []).append(inner.instance_uid)
        return [SeriesBatch(study, series, tuple(dict.fromkeys(uids)))
                for (study, series), uids in batches.items()]  # fmt: skip

    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        with self.archive._lock:
            self.archive.fetches.append(reference)
            if self.archive.fail_first > 0:
                self.archive.fail_first -= 1
                raise ConnectionFailedError("the fake archive is down for now")
        sent = 0
        for instance in _under(self.archive.instances, reference):
            if instance.sop_uid in self.archive.lose:
                continue
            write_instance(sink, instance.data)
            sent += 1
        return sent


def _under(instances: Iterable[GeneratedInstance], ref: Reference) -> list[GeneratedInstance]:
    found = [i for i in instances if i.study_uid == ref.study_uid]
    if isinstance(ref, (SeriesReference, InstanceReference)):
        found = [i for i in found if i.series_uid == ref.series_uid]
    if isinstance(ref, InstanceReference):
        found = [i for i in found if i.sop_uid == ref.instance_uid]
    if isinstance(ref, SeriesBatch):
        found = [i for i in found if i.sop_uid in ref.instance_uids]
    return found
