"""C-FIND search (DICOM Query/Retrieve, Study Root information model, PS3.4 C.4.1).

A Query becomes one C-FIND identifier per combination of list values: C-FIND matches several
values at once only for UIDs (list of UID matching, backslash-separated); any other list
(`Modality=["CT", "MR"]`) is an OR that C-FIND cannot express, so each value gets its own
C-FIND on the same association and the rows are united, deduplicated by their UIDs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, keyword_dict
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from trolley_etl.backends.dimse import (
    STUDY_ROOT_FIND,
    DimseSettings,
    association,
    dimse_settings,
    level_name,
    lost_association_error,
    status_meaning,
    status_of,
)
from trolley_etl.core.backend import Searcher
from trolley_etl.core.errors import DimseStatusError, QueryError
from trolley_etl.core.model import TREE_KEYS, QueryLevel, Study, tree_from_rows
from trolley_etl.core.query import Query
from trolley_etl.core.splitting import Event, split_search

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from trolley_etl.backends.dimse import DimseOptions

#: Return keys asked for by default, like QIDO-RS's default attributes (PS3.18 10.6.3.3).
STUDY_RETURN_KEYS = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDescription",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_RETURN_KEYS = (
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)
INSTANCE_RETURN_KEYS = ("SOPClassUID", "InstanceNumber", "NumberOfFrames")
#: VRs whose empty value is None rather than "" (pydicom warns about "" for them).
_BINARY_VRS = frozenset(
    ["AT", "FD", "FL", "OB", "OD", "OF", "OL", "OV", "OW", "SL", "SS", "SV", "UL", "UN", "US", "UV"]
)
#: More OR combinations than this is almost certainly a mistake (each is one C-FIND).
MAX_FINDS = 256


class DicomQR(Searcher):
    """Search a DICOM archive with C-FIND.

    `limit` stops the search with a C-CANCEL once enough distinct rows arrived; `offset`
    skips rows. Study-level attributes are asked for at every level, so series and instance
    rows fill their Study the way QIDO-RS rows do. `uid_list_matching=False` sends one
    C-FIND per UID for archives that fail on list of UID matching (pynetdicom's qrscp).
    `max_results` is the archive's cap on one C-FIND: searches that reach it are split by
    StudyDate and StudyTime until no part does (see `core.splitting`).
    """

    def __init__(
        self,
        host: str | DimseSettings,
        port: int | None = None,
        called_aet: str | None = None,
        calling_aet: str = "TROLLEY",
        *,
        uid_list_matching: bool = True,
        max_results: int | None = None,
        **dimse: Unpack[DimseOptions],
    ) -> None:
        """`host` names the archive (with `port`, `called_aet` and `dimse` options), or is
        whole DimseSettings."""
        self.uid_list_matching = uid_list_matching
        self.max_results = max_results
        self.on_split: Event | None = None
        self.settings = dimse_settings(host, port, called_aet, calling_aet, dimse)

    def search(self, query: Query) -> list[Study]:
        """The studies matching `query` (split by date when the archive caps answers)."""
        return split_search(self.search_once, query, self.max_results, self.on_split)

    def search_once(self, query: Query) -> list[Study]:
        """One search as asked, without splitting."""
        return tree_from_rows(self.iter_rows(query), query.query_level)

    def iter_rows(self, query: Query) -> Iterator[Dataset]:
        """Distinct matching rows, as they arrive, within the query's offset and limit."""
        identifiers = identifiers_for(query, uid_list_matching=self.uid_list_matching)
        ae = self.settings.make_ae()
        ae.add_requested_context(STUDY_ROOT_FIND)
        seen: set[tuple[str, ...]] = set()
        skip, remaining = query.offset, query.limit
        keys = TREE_KEYS[query.query_level]
        with association(self.settings, ae, what="C-FIND") as assoc:
            for msg_id, identifier in enumerate(identifiers, start=1):
                responses = self._find(assoc, identifier, msg_id)
                for row in responses:
                    key = tuple(str(row.get(k, "")) for k in keys)
                    if key in seen:
                        continue  # another C-FIND (or an archive answering per instance) had it
                    seen.add(key)
                    if skip:
                        skip -= 1
                        continue
                    yield row
                    if remaining is not None:
                        remaining -= 1
                        if remaining == 0:
                            self._cancel(assoc, msg_id, responses)
                            return

    def _find(self, assoc: Association, identifier: Dataset, msg_id: int) -> Iterator[Dataset]:
        """The pending rows of one C-FIND; raises on a failure status."""
        for status, row in assoc.send_c_find(identifier, STUDY_ROOT_FIND, msg_id=msg_id):
            code = status_of(status)
            if code is None:
                raise lost_association_error(assoc, self.settings, "C-FIND")
            category = code_to_category(code)
            if category == "Pending":
                if row is not None:
                    yield row
                continue
            if category in ("Success", "Cancel"):
                return
            raise DimseStatusError(
                f"C-FIND {self.settings.describe()}: status {status_meaning(code, 'C-FIND')}",
                url=self.settings.url,
                status=code,
            )

    def _cancel(self, assoc: Association, msg_id: int, responses: Iterator[Dataset]) -> None:
        """Ask the archive to stop (C-CANCEL); read what it still sends, up to its final status."""
        assoc.send_c_cancel(msg_id, query_model=STUDY_ROOT_FIND)
        try:
            for _ in responses:
                pass  # rows already in flight are dropped
        except DimseStatusError:
            pass  # whatever the archive says after a cancel, we have what we asked for


def identifiers_for(query: Query, *, uid_list_matching: bool = True) -> list[Dataset]:
    """The C-FIND identifiers for a query: one per combination of non-UID list values."""
    level = query.query_level
    fixed: dict[str, str] = {}
    alternatives: list[tuple[str, tuple[str, ...]]] = []
    for keyword, value in query.filters.items():
        is_uid = dictionary_VR(keyword_dict[keyword]) == "UI"
        if isinstance(value, tuple) and not (is_uid and uid_list_matching):
            alternatives.append((keyword, value))
        else:
            fixed[keyword] = query.dicom_value(keyword)  # UIDs: backslash-separated list
    combinations = 1
    for _, values in alternatives:
        combinations *= len(values)
    if combinations > MAX_FINDS:
        raise QueryError(
            f"the list filters need {combinations} C-FIND requests (at most {MAX_FINDS}); "
            "narrow the lists"
        )
    return_keys = [*STUDY_RETURN_KEYS, *TREE_KEYS[level]]
    if level is not QueryLevel.STUDY:
        return_keys += SERIES_RETURN_KEYS
    if level is QueryLevel.INSTANCE:
        return_keys += INSTANCE_RETURN_KEYS
    return_keys += query.include_fields
    identifiers = []
    for choice in itertools.product(*(values for _, values in alternatives)):
        chosen = {kw: v for (kw, _), v in zip(alternatives, choice, strict=True)}
        identifiers.append(_identifier(level, {**fixed, **chosen}, return_keys))
    return identifiers


def _identifier(level: QueryLevel, values: dict[str, str], return_keys: list[str]) -> Dataset:
    ds = Dataset()
    if any(not v.isascii() for v in values.values()):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level_name(level)
    for keyword in dict.fromkeys([*values, *return_keys]):
        vr = dictionary_VR(keyword_dict[keyword]).split(" or ")[0]
        empty: str | list[Any] | None = [] if vr == "SQ" else None if vr in _BINARY_VRS else ""
        setattr(ds, keyword, values.get(keyword, empty))
    return ds
