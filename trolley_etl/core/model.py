"""The object model: studies, series and instances, and references to them.

Searchers return trees (Study -> Series -> Instance) that may be partial: a study found by a
study-level search does not know its series yet (`series is None`). Downloaders work on
references (UIDs only). `contained_references` turns either into references at the level a
downloader needs, and says clearly when the tree is not deep enough.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from trolley_etl.core.errors import InvalidUidError, MissingReferencesError
from trolley_etl.core.uids import rejected_rows, single_uid

if TYPE_CHECKING:
    from pydicom import Dataset


class QueryLevel(str, Enum):
    """The three levels of the DICOM information model (Study Root)."""

    STUDY = "study"
    SERIES = "series"
    INSTANCE = "instance"

    @property
    def depth(self) -> int:
        """0 for study, 1 for series, 2 for instance."""
        return _DEPTH[self]

    def is_above(self, other: QueryLevel) -> bool:
        """True when this level is coarser than `other` (study is above series)."""
        return self.depth < other.depth


_DEPTH = {QueryLevel.STUDY: 0, QueryLevel.SERIES: 1, QueryLevel.INSTANCE: 2}


# --- references: UIDs only ------------------------------------------------------------------


@dataclass(frozen=True)
class StudyReference:
    """A whole study, by its Study Instance UID."""

    study_uid: str
    level: ClassVar[QueryLevel] = QueryLevel.STUDY

    def contained_references(self, max_level: QueryLevel) -> list[Reference]:
        """Itself; a deeper level raises MissingReferencesError (those must be searched)."""
        return _own_reference_or_raise(self, max_level)


@dataclass(frozen=True)
class SeriesReference:
    """One series of a study."""

    study_uid: str
    series_uid: str
    level: ClassVar[QueryLevel] = QueryLevel.SERIES

    def contained_references(self, max_level: QueryLevel) -> list[Reference]:
        """Itself; instance level raises MissingReferencesError (those must be searched)."""
        return _own_reference_or_raise(self, max_level)


@dataclass(frozen=True)
class InstanceReference:
    """One instance of a series."""

    study_uid: str
    series_uid: str
    instance_uid: str
    level: ClassVar[QueryLevel] = QueryLevel.INSTANCE

    def contained_references(self, max_level: QueryLevel) -> list[Reference]:
        """Itself: an instance is the deepest level."""
        return _own_reference_or_raise(self, max_level)


@dataclass(frozen=True)
class SeriesInstances(SeriesReference):
    """A series and the instances of it to retrieve as one unit (RAD-69 and WADO-URI batches).

    One unit per series instead of one per instance: the runner keeps one item (and one
    completeness check) per series, and the downloader may fetch the instances in parallel.
    """

    instance_uids: tuple[str, ...] = ()

    def contained_references(self, max_level: QueryLevel) -> list[Reference]:
        """Its instances, when asked for instances (so it can be planned again)."""
        if max_level is QueryLevel.INSTANCE and self.instance_uids:
            return [
                InstanceReference(self.study_uid, self.series_uid, uid)
                for uid in self.instance_uids
            ]
        return super().contained_references(max_level)


Reference = StudyReference | SeriesReference | InstanceReference


def _own_reference_or_raise(ref: Reference, max_level: QueryLevel) -> list[Reference]:
    if ref.level.is_above(max_level):
        raise MissingReferencesError(
            max_level, f"{ref} holds no {max_level.value}-level references; they must be searched"
        )
    return [ref]


# --- search results: a tree of objects with the attributes the archive returned --------------


def _empty_dataset() -> Dataset:
    """A new empty Dataset; pydicom is loaded here, on first use, not when this module is:
    the references above (all a checkpoint needs) must stay cheap to import."""
    import pydicom

    return pydicom.Dataset()


@dataclass(eq=False)
class Instance:
    """A found instance and its search row."""

    uid: str
    series_uid: str
    study_uid: str
    data: Dataset = field(default_factory=_empty_dataset, repr=False)
    level: ClassVar[QueryLevel] = QueryLevel.INSTANCE

    def reference(self) -> InstanceReference:
        """The reference that retrieves it."""
        return InstanceReference(self.study_uid, self.series_uid, self.uid)

    def contained_references(self, max_level: QueryLevel) -> list[Reference]:
        """Its own reference."""
        return [self.reference()]

    def merge(self, other: Instance) -> None:
        """Take in the attributes another row gave for the same instance."""
        _merge_data(self.data, other.data)


@dataclass(eq=False)
class Series:
    """A found series, its search row, and its instances once searched."""

    uid: str
    study_uid: str
    data: Dataset = field(default_factory=_empty_dataset, repr=False)
    instances: list[Instance] | None = None  # None: not searched yet; [] means known empty

    level: ClassVar[QueryLevel] = QueryLevel.SERIES

    def reference(self) -> SeriesReference:
        """The reference that retrieves it."""
        return SeriesReference(self.study_uid, self.uid)

    def contained_references(self, max_level: QueryLevel) -> list[Reference]:
        """Itself, or its instances at instance level (MissingReferencesError until searched)."""
        if max_level is not QueryLevel.INSTANCE:
            return [self.reference()]
        if self.instances is None:
            raise MissingReferencesError(
                max_level, f"series {self.uid} has no instances; they must be searched"
            )
        return [instance.reference() for instance in self.instances]

    def merge(self, other: Series) -> None:
        """Take in another row for the same series, and its instances."""
        _merge_data(self.data, other.data)
        self.instances = _merge_children(self.instances, other.instances)


@dataclass(eq=False)
class Study:
    """A found study, its search row, and its series once searched."""

    uid: str
    data: Dataset = field(default_factory=_empty_dataset, repr=False)
    series: list[Series] | None = None  # None: not searched yet; [] means known empty

    level: ClassVar[QueryLevel] = QueryLevel.STUDY

    def reference(self) -> StudyReference:
        """The reference that retrieves it."""
        return StudyReference(self.uid)

    def contained_references(self, max_level: QueryLevel) -> list[Reference]:
        """Itself, or its series or instances when a deeper level is needed."""
        if max_level is QueryLevel.STUDY:
            return [self.reference()]
        if self.series is None:
            raise MissingReferencesError(
                max_level, f"study {self.uid} has no series; they must be searched"
            )
        return [ref for series in self.series for ref in series.contained_references(max_level)]

    def merge(self, other: Study) -> None:
        """Fold another partial result about the same study into this one."""
        _merge_data(self.data, other.data)
        self.series = _merge_children(self.series, other.series)

    def all_series(self) -> list[Series]:
        """Every series searched so far."""
        return list(self.series or [])

    def all_instances(self) -> list[Instance]:
        """Every instance searched so far."""
        return [i for s in self.all_series() for i in (s.instances or [])]


DicomObject = Study | Series | Instance
Retrievable = DicomObject | Reference


def _merge_data(target: Dataset, source: Dataset) -> None:
    for element in source:
        if element.tag not in target or target[element.tag].value in (None, "", b""):
            target[element.tag] = element


def _merge_children(mine: list[Any] | None, theirs: list[Any] | None) -> list[Any] | None:
    if theirs is None:
        return mine
    if mine is None:
        return list(theirs)
    by_uid = {child.uid: child for child in mine}
    for child in theirs:
        if child.uid in by_uid:
            by_uid[child.uid].merge(child)
        else:
            mine.append(child)
            by_uid[child.uid] = child
    return mine


def merge_studies(studies: Iterable[Study]) -> list[Study]:
    """Merge partial results into one Study per StudyInstanceUID, keeping first-seen order."""
    merged: dict[str, Study] = {}
    for study in studies:
        if study.uid in merged:
            merged[study.uid].merge(study)
        else:
            merged[study.uid] = study
    return list(merged.values())


def contained_references(objects: Iterable[Retrievable], max_level: QueryLevel) -> list[Reference]:
    """References at `max_level` (or finer, if an object is finer) for all objects.

    Raises MissingReferencesError when any object lacks the levels asked for.
    """
    return [ref for obj in objects for ref in obj.contained_references(max_level)]


def iter_references(objects: Iterable[Retrievable]) -> Iterator[Reference]:
    """Each object's own reference, at its own level."""
    for obj in objects:
        yield (
            obj
            if isinstance(obj, (StudyReference, SeriesReference, InstanceReference))
            else (obj.reference())
        )


# --- building trees from flat search results ----------------------------------------------------

#: Attributes that describe a patient or a study (Patient and General Study modules, plus the
#: study-level query attributes); a series- or instance-level search row is split on these.
STUDY_KEYWORDS = frozenset(
    {
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "IssuerOfPatientID",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "StudyDescription",
        "ReferringPhysicianName",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "InstitutionName",
    }
)

SERIES_KEYWORDS = frozenset(
    {
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "SeriesDate",
        "SeriesTime",
        "BodyPartExamined",
        "NumberOfSeriesRelatedInstances",
        "PerformedProcedureStepStartDate",
    }
)


#: The UIDs that place a row at each level in the tree (and that rows are deduplicated on);
#: every searcher asks for them.
TREE_KEYS: dict[QueryLevel, tuple[str, ...]] = {
    QueryLevel.STUDY: ("StudyInstanceUID",),
    QueryLevel.SERIES: ("StudyInstanceUID", "SeriesInstanceUID"),
    QueryLevel.INSTANCE: ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"),
}


def _subset(row: Dataset, keywords: frozenset[str]) -> Dataset:
    subset = _empty_dataset()
    for element in row:
        if element.keyword in keywords:
            subset[element.tag] = element
    return subset


def tree_from_rows(rows: Iterable[Dataset], level: QueryLevel) -> list[Study]:
    """Assemble flat search rows at `level` into merged Study trees.

    A study-level row becomes a Study whose series are unknown (None); a series-level row a
    Study holding that one Series (instances unknown), and so on. Rows about the same study are
    merged, so the result has one Study per StudyInstanceUID.
    """
    studies: list[Study] = []
    for row in rows:
        try:  # a row with a bad UID is reported and skipped, never fetched (core.uids)
            uids = [single_uid(row.get(keyword), keyword) for keyword in TREE_KEYS[level]]
        except InvalidUidError as exc:
            rejected_rows.add(level.value, str(exc), _row_summary(row))
            continue
        study_uid = uids[0]
        if level is QueryLevel.STUDY:
            studies.append(Study(study_uid, data=row))
            continue
        series_uid = uids[1]
        if level is QueryLevel.SERIES:
            series = Series(series_uid, study_uid, data=row)
        else:
            instance = Instance(uids[2], series_uid, study_uid, row)
            series_data = _subset(row, SERIES_KEYWORDS)
            series = Series(series_uid, study_uid, data=series_data, instances=[instance])
        studies.append(Study(study_uid, data=_subset(row, STUDY_KEYWORDS), series=[series]))
    return merge_studies(studies)


def _row_summary(row: Dataset) -> dict[str, str]:
    """What identifies a rejected row in a report, each value short and on one line."""
    summary = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber"):
        value = row.get(keyword)
        if value is not None and value != "":
            summary[keyword] = repr(value)[:80]
    return summary
