"""The in-memory archive: a Searcher and a Downloader over Datasets held in memory.

Why a fake at all: the runner's behaviours (completeness, retries, archive drift, resume)
can be shown in milliseconds here instead of a real server's seconds, by users testing their
own manifests or code and by the project's fast test tier alike.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pydicom
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from trolley_etl.backends.matching import matches
from trolley_etl.core.backend import Downloader, InstanceSink, Searcher, write_instance
from trolley_etl.core.errors import ConnectionFailedError
from trolley_etl.core.model import (
    InstanceReference,
    QueryLevel,
    Reference,
    Retrievable,
    SeriesInstances,
    SeriesReference,
    Study,
    contained_references,
    tree_from_rows,
)
from trolley_etl.core.query import Query

#: The header fields a search can match on and answers with (the UIDs always come).
HEADER_KEYWORDS = ("PatientID", "AccessionNumber", "StudyDate", "Modality", "SeriesDescription")
#: Secondary Capture Image Storage: the SOP class of :func:`make_dataset`'s instances.
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


class _HasData(Protocol):
    """Anything carrying a Part 10 file as ``data`` (the harness's generated instances)."""

    @property
    def data(self) -> bytes: ...


def make_dataset(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    **keywords: object,
) -> Dataset:
    """A small valid instance (Secondary Capture, no pixel data) with the given keywords.

    UIDs not given are generated; give the same `study_uid` to put instances in one study.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "OT"
    for keyword, value in keywords.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@dataclass(frozen=True)
class _Held:
    """One instance as the fake archive holds it: its Part 10 bytes and its search header."""

    study_uid: str
    series_uid: str
    sop_uid: str
    data: bytes = field(repr=False)
    header: Dataset = field(repr=False, compare=False)


def _hold(item: Dataset | bytes | _HasData) -> _Held:
    if isinstance(item, Dataset):
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, item, enforce_file_format=True)
        data = buffer.getvalue()
    elif isinstance(item, bytes):
        data = item
    else:
        data = item.data
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    header = Dataset()
    for keyword in HEADER_KEYWORDS:
        if keyword in ds:
            setattr(header, keyword, ds.data_element(keyword).value)  # type: ignore[union-attr]
    header.StudyInstanceUID = ds.StudyInstanceUID
    header.SeriesInstanceUID = ds.SeriesInstanceUID
    header.SOPInstanceUID = ds.SOPInstanceUID
    return _Held(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), data, header
    )


class FakeArchive:
    """What the fake archive holds, and how its two backends misbehave.

    `instances` are pydicom Datasets, Part 10 bytes, or objects with a ``data`` attribute
    holding Part 10 bytes. The misbehaviours are plain attributes a test may change
    between runs.
    """

    def __init__(
        self,
        instances: Iterable[Dataset | bytes | _HasData],
        *,
        counts_in_answers: bool = True,
        lose: Iterable[str] = (),
        unlisted: Iterable[str] = (),
        fail_first: int = 0,
        instance_level: bool = False,
    ) -> None:
        self.held = [_hold(item) for item in instances]
        #: False: search answers carry no NumberOf...RelatedInstances.
        self.counts_in_answers = counts_in_answers
        #: SOPInstanceUIDs the downloader never sends.
        self.lose: set[str] = set(lose)
        #: SOPInstanceUIDs held and sent, but never found by a search.
        self.unlisted: set[str] = set(unlisted)
        #: Fetches that fail (with a transient error) before any succeeds.
        self.fail_first = fail_first
        #: The downloader retrieves named instances in batches per series (like RAD-69).
        self.instance_level = instance_level
        #: Every query and every reference asked for, in order.
        self.searches: list[Query] = []
        self.fetches: list[Reference] = []
        self.lock = threading.Lock()

    def searcher(self) -> FakeSearcher:
        """A Searcher over this archive."""
        return FakeSearcher(self)

    def downloader(self) -> FakeDownloader:
        """A Downloader over this archive."""
        return FakeDownloader(self)

    def backends(self, manifest: object) -> tuple[Searcher, Downloader]:
        """A `Runner(backends=...)` factory: the manifest's source is ignored."""
        return self.searcher(), self.downloader()

    def listed(self) -> list[_Held]:
        """The instances a search can find."""
        return [i for i in self.held if i.sop_uid not in self.unlisted]


class FakeSearcher(Searcher):
    """Answers C-FIND/QIDO-RS style searches from the archive's headers."""

    def __init__(self, archive: FakeArchive) -> None:
        self.archive = archive

    def search(self, query: Query) -> list[Study]:
        """The matching objects at the query's level, with instance counts."""
        with self.archive.lock:
            self.archive.searches.append(query)
        listed = self.archive.listed()
        hits = [i for i in listed if matches(i.header, dict(query.filters))]
        rows: dict[tuple[str, ...], Dataset] = {}
        for held in hits:
            key = (held.study_uid, held.series_uid, held.sop_uid)[: query.query_level.depth + 1]
            if key not in rows:
                rows[key] = self._row(held, query.query_level, listed)
        return tree_from_rows(list(rows.values()), query.query_level)

    def _row(self, held: _Held, level: QueryLevel, listed: list[_Held]) -> Dataset:
        row = Dataset()
        row.update(held.header)
        if level is not QueryLevel.INSTANCE:
            del row.SOPInstanceUID
        if level is QueryLevel.STUDY:
            del row.SeriesInstanceUID
        if self.archive.counts_in_answers:
            in_study = [i for i in listed if i.study_uid == held.study_uid]
            row.NumberOfStudyRelatedInstances = len(in_study)
            if level is not QueryLevel.STUDY:
                in_series = [i for i in in_study if i.series_uid == held.series_uid]
                row.NumberOfSeriesRelatedInstances = len(in_series)
        return row


#: Instances of one series fetched in one request (as RAD-69 batches them): the library's
#: own unit for that, under the name the fakes first gave it.
SeriesBatch = SeriesInstances


class FakeDownloader(Downloader):
    """Sends the archive's Part 10 bytes, minus what it was told to lose."""

    retrieval_level: QueryLevel | None = None

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
        return [
            SeriesBatch(study, series, tuple(dict.fromkeys(uids)))
            for (study, series), uids in batches.items()
        ]

    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        """Write every held instance under `reference` to `sink`; returns how many."""
        with self.archive.lock:
            self.archive.fetches.append(reference)
            if self.archive.fail_first > 0:
                self.archive.fail_first -= 1
                raise ConnectionFailedError("the fake archive is down for now")
        sent = 0
        for held in _under(self.archive.held, reference):
            if held.sop_uid in self.archive.lose:
                continue
            write_instance(sink, held.data)
            sent += 1
        return sent


def _under(held: Iterable[_Held], ref: Reference) -> list[_Held]:
    found = [i for i in held if i.study_uid == ref.study_uid]
    if isinstance(ref, (SeriesReference, InstanceReference)):
        found = [i for i in found if i.series_uid == ref.series_uid]
    if isinstance(ref, InstanceReference):
        found = [i for i in found if i.sop_uid == ref.instance_uid]
    if isinstance(ref, SeriesBatch):
        found = [i for i in found if i.sop_uid in ref.instance_uids]
    return found
