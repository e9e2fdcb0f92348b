"""MINT study search (Medical Imaging Network Transport, NEMA MINT working group).

`GET {url}/studies?PatientID=...&QueryLevel=STUDY|SERIES|INSTANCE&IncludeFields=...` answers
with XML in the namespace `http://medical.nema.org/mint`:

    <studySearchResults xmlns="http://medical.nema.org/mint" ...>
      <study studyUUID="..." version="1" lastModified="...">
        <attr tag="00100020" vr="LO" val="TRL001"/> ...
        <series> <attr .../> <instance> <attr .../> </instance> </series>
      </study>
    </studySearchResults>

(the form MINT servers such as Vitrea Connection 8 answer, as recorded in the dicomtrolley
reference; `<studySearchResult>` study elements are read as well). A MINT server filters only
on a few study-level parameters, so every other filter is applied here with DICOM matching
rules (trolley_etl.backends.matching), at the level it belongs to.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element

import requests
from pydicom import DataElement, Dataset
from pydicom.datadict import keyword_for_tag

from trolley_etl.backends.http import HttpSettings, http_settings
from trolley_etl.backends.matching import deepest_level, matches
from trolley_etl.backends.xmlsafe import children, local_name, parse_xml
from trolley_etl.core.backend import Searcher
from trolley_etl.core.errors import ConfigurationError, ResponseFormatError
from trolley_etl.core.model import (
    SERIES_KEYWORDS,
    STUDY_KEYWORDS,
    TREE_KEYS,
    QueryLevel,
    Study,
    tree_from_rows,
)
from trolley_etl.core.query import FilterValue, Query

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from trolley_etl.backends.http import HttpOptions

MINT_NAMESPACE = "http://medical.nema.org/mint"
#: Study-level keywords a MINT server filters on, sent under their DICOM keyword.
SERVER_FILTERS = frozenset(
    {
        "PatientID",
        "PatientName",
        "AccessionNumber",
        "StudyInstanceUID",
        "ModalitiesInStudy",
        "StudyDescription",
        "PatientSex",
        "InstitutionName",
        "InstitutionalDepartmentName",
        "PatientBirthDate",
    }
)
#: The oldest and the latest date MINT's minStudyDate/maxStudyDate pair can stand for.
OPEN_START, OPEN_END = "19000101", "99991231"
#: At most this many requests are made to split a list filter the server cannot take.
MAX_LIST_REQUESTS = 100
_LEVEL_PARAM = {
    QueryLevel.STUDY: "STUDY",
    QueryLevel.SERIES: "SERIES",
    QueryLevel.INSTANCE: "INSTANCE",
}
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"})


class Mint(Searcher):
    """Search a MINT server; results are Study trees like every other searcher's.

    `page_size=None` (the default) asks for all results in one answer, as MINT servers
    expect. A server that caps its answers and understands `limit`/`offset` can be read in
    pages with `page_size=N`; a server that ignores `offset` is detected (the same studies
    come back) and reported instead of looping.
    """

    def __init__(
        self,
        url: str | HttpSettings,
        *,
        session: requests.Session | None = None,
        page_size: int | None = None,
        **http: Unpack[HttpOptions],
    ) -> None:
        """`url` is the base URL (with `http` options) or whole HttpSettings."""
        if page_size is not None and page_size < 1:
            raise ConfigurationError("page_size must be at least 1")
        self.http = http_settings(url, http).client(session)
        self.page_size = page_size

    # --- the Searcher interface --------------------------------------------------------------

    def search(self, query: Query) -> list[Study]:
        """The studies matching `query`, as the MINT service answers."""
        level = deepest_level(query.filters, query.query_level)
        server = {k: v for k, v in query.filters.items() if k in SERVER_FILTERS or k == "StudyDate"}
        rows = [
            row
            for row in self._rows(query, level, server)
            # Server-side filters are checked again where the answer carries the attribute;
            # where it does not, the server's word is taken.
            if matches(row, query.filters, missing_ok=frozenset(server))
        ]
        if level is not query.query_level:
            rows = _collapse(rows, query.query_level)
        rows = rows[query.offset :]
        if query.limit is not None:
            rows = rows[: query.limit]
        return tree_from_rows(rows, query.query_level)

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()

    # --- requests ----------------------------------------------------------------------------

    def _rows(
        self, query: Query, level: QueryLevel, server: dict[str, FilterValue]
    ) -> Iterator[Dataset]:
        """Rows at `level`, from one request per value of a list filter the server cannot take."""
        seen: set[tuple[str, ...]] = set()
        for params in self._parameter_sets(query, level, server):
            for row in self._pages(params, level):
                key = tuple(str(row.get(k, "")) for k in TREE_KEYS[level])
                if key not in seen:
                    seen.add(key)
                    yield row

    def _parameter_sets(
        self, query: Query, level: QueryLevel, server: dict[str, FilterValue]
    ) -> list[list[tuple[str, object]]]:
        base: list[tuple[str, object]] = [("QueryLevel", _LEVEL_PARAM[level])]
        split_keyword, split_values = None, [""]
        for keyword, value in server.items():
            if keyword == "StudyDate":
                base.extend(_date_params(value))
            elif isinstance(value, tuple):
                if split_keyword is None and len(value) <= MAX_LIST_REQUESTS:
                    split_keyword, split_values = keyword, list(value)
                # other lists are matched locally only
            elif value != "":
                base.append((keyword, value))
        include = [k for k in query.filters if k not in SERVER_FILTERS]
        include += [k for k in query.include_fields if k not in include]
        include += [k for k in TREE_KEYS[level] if k not in include]
        base.append(("IncludeFields", ",".join(include)))
        if split_keyword is None:
            return [base]
        return [[*base, (split_keyword, value)] for value in split_values]

    def _pages(self, params: list[tuple[str, object]], level: QueryLevel) -> Iterator[Dataset]:
        if self.page_size is None:
            yield from _rows_at(self._get(params), level)
            return
        offset, first_uuids = 0, set[str]()
        while True:
            studies = self._get([*params, ("limit", self.page_size), ("offset", offset)])
            uuids = {s.get("studyUUID", "") for s in studies}
            if offset and uuids and uuids <= first_uuids:
                raise ResponseFormatError(
                    f"{self.http.url('studies')}: the server ignores 'offset' (page {offset} "
                    "repeats earlier studies); use Mint(url) without page_size",
                    url=self.http.url("studies"),
                )
            first_uuids |= uuids
            yield from _rows_at(studies, level)
            if len(studies) < self.page_size:
                return
            offset += len(studies)

    def _get(self, params: list[tuple[str, object]]) -> list[Element]:
        response, body = self.http.get_bounded(  # bounded: never trust the archive (issue 13)
            "studies", params=params, headers={"Accept": "application/xml"}
        )
        if response.status_code == 204 or not body.strip():
            return []
        root = parse_xml(body, url=response.url, what="the MINT search answer")
        if local_name(root) != "studySearchResults":
            raise ResponseFormatError(
                f"{response.url}: expected <studySearchResults>, got <{local_name(root)}>",
                url=response.url,
            )
        return children(root, "study") + children(root, "studySearchResult")


def _date_params(value: FilterValue) -> list[tuple[str, object]]:
    """MINT's date range parameters; both are needed, an open side becomes a far date."""
    if isinstance(value, tuple) or value == "":
        return []  # several dates: matched locally
    start, _, end = value.partition("-") if "-" in value else (value, "", value)
    return [("minStudyDate", start or OPEN_START), ("maxStudyDate", end or OPEN_END)]


def parse_attributes(element: Element) -> Dataset:
    """The `<attr tag vr val/>` children of an element as a Dataset (binary values skipped)."""
    dataset = Dataset()
    for attr in children(element, "attr"):
        tag_text, vr = attr.get("tag", ""), attr.get("vr", "")
        try:
            tag = int(tag_text, 16)
        except ValueError:
            raise ResponseFormatError(f"MINT attribute with a bad tag {tag_text!r}") from None
        if vr in _BINARY_VRS or not keyword_for_tag(tag):
            continue
        try:
            dataset[tag] = DataElement(tag, vr, attr.get("val", ""))
        except (ValueError, TypeError) as exc:
            raise ResponseFormatError(f"MINT attribute {tag_text} ({vr}): {exc}") from None
    return dataset


def _rows_at(studies: list[Element], level: QueryLevel) -> Iterator[Dataset]:
    """Flat rows at `level`: each row holds its study's (and series') attributes too."""
    for element in studies:
        study = parse_attributes(element)
        if level is QueryLevel.STUDY:
            yield study
            continue
        for series_element in children(element, "series"):
            series = _joined(study, parse_attributes(series_element))
            if level is QueryLevel.SERIES:
                yield series
                continue
            for instance_element in children(series_element, "instance"):
                yield _joined(series, parse_attributes(instance_element))


def _joined(parent: Dataset, child: Dataset) -> Dataset:
    row = Dataset()
    row.update(parent)
    row.update(child)
    return row


def _collapse(rows: list[Dataset], level: QueryLevel) -> list[Dataset]:
    """Rows searched at a finer level than asked, reduced to one row per object at `level`."""
    keep = STUDY_KEYWORDS if level is QueryLevel.STUDY else STUDY_KEYWORDS | SERIES_KEYWORDS
    collapsed: dict[tuple[str, ...], Dataset] = {}
    for row in rows:
        key = tuple(str(row.get(k, "")) for k in TREE_KEYS[level])
        if key not in collapsed:
            reduced = Dataset()
            for element in row:
                if element.keyword in keep:
                    reduced[element.tag] = element
            collapsed[key] = reduced
    return list(collapsed.values())
