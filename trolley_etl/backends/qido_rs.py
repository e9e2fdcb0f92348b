"""QIDO-RS search (DICOMweb, PS3.18 10.6), with paging."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import requests
from pydicom import Dataset

from trolley_etl.backends.dicom_json import datasets_from_json, parse_json
from trolley_etl.backends.http import (
    HttpSettings,
    http_settings,
)
from trolley_etl.core.backend import Searcher
from trolley_etl.core.errors import ConfigurationError, ResponseFormatError, ResultsCappedError
from trolley_etl.core.model import TREE_KEYS, QueryLevel, Study, tree_from_rows
from trolley_etl.core.query import Query
from trolley_etl.core.splitting import Event, split_search

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from trolley_etl.backends.http import HttpOptions

DEFAULT_PAGE_SIZE = 1000
#: Pages one search may take before it is considered endless.
DEFAULT_MAX_PAGES = 10_000
_RESOURCE = {
    QueryLevel.STUDY: "studies",
    QueryLevel.SERIES: "series",
    QueryLevel.INSTANCE: "instances",
}


class QidoRS(Searcher):
    """Search a DICOMweb server.

    Results are fetched in pages of `page_size` with `limit`/`offset`; paging goes on while
    the server returns full pages or says (Warning 299, PS3.18 8.3.4.4) that more results
    exist, so servers that cap their answers still give every match. A server that caps
    silently, without the warning, needs `page_size` at or below its cap.

    `max_results` is the archive's cap on one search: searches that reach it (or that it
    announces more results for than it will page through) are split by StudyDate and
    StudyTime until no part does (see `core.splitting`); `on_split` hears about each split.
    """

    def __init__(
        self,
        url: str | HttpSettings,
        *,
        session: requests.Session | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        max_pages: int = DEFAULT_MAX_PAGES,
        max_results: int | None = None,
        **http: Unpack[HttpOptions],
    ) -> None:
        """`url` is the base URL (with `http` options) or whole HttpSettings."""
        if page_size < 1:
            raise ConfigurationError("page_size must be at least 1")
        self.http = http_settings(url, http).client(session)
        self.page_size = page_size
        self.max_pages = max_pages
        self.max_results = max_results
        self.on_split: Event | None = None

    def search(self, query: Query) -> list[Study]:
        """The studies matching `query`, page by page (split by date at the archive's cap)."""
        return split_search(self.search_once, query, self.max_results, self.on_split)

    def search_once(self, query: Query) -> list[Study]:
        """One search as asked, without splitting."""
        return tree_from_rows(self.iter_rows(query), query.query_level)

    def iter_rows(self, query: Query) -> Iterator[Dataset]:
        """Every matching row, page by page, as pydicom Datasets."""
        path, params = self._request(query)
        offset, remaining = query.offset, query.limit
        page_size = self.page_size
        previous: list[str] | None = None
        pages = 0
        more_announced = False
        while remaining is None or remaining > 0:
            pages += 1
            if pages > self.max_pages:
                raise ResponseFormatError(
                    f"{self.http.url(path)}: the search did not end after {self.max_pages} "
                    "pages (run.limits.max_search_pages)",
                    url=self.http.url(path),
                )
            asked = page_size if remaining is None else min(page_size, remaining)
            announced_before = more_announced
            page, more_announced = self._page(path, [*params, ("limit", asked), ("offset", offset)])
            keys = [_row_key(row) for row in page]
            if page and keys == previous:  # a server that ignores offset would page forever
                raise ResponseFormatError(
                    f"{self.http.url(path)}: the archive answered offset {offset} with the same "
                    "page as before (it ignores offset); lower page_size to its limit",
                    url=self.http.url(path),
                )
            previous = keys
            if not page and announced_before:
                raise ResultsCappedError(  # the splitting searcher narrows the query instead
                    f"{self.http.url(path)}: the archive announced more results (Warning 299) "
                    f"but answers none past offset {offset}"
                )
            yield from page
            offset += len(page)
            if remaining is not None:
                remaining -= len(page)
            if not page or (len(page) < asked and not more_announced):
                return
            if more_announced:
                page_size = min(page_size, len(page))  # the server's cap: ask for no more

    def _page(self, path: str, params: list[tuple[str, object]]) -> tuple[list[Dataset], bool]:
        response, body = self.http.get_bounded(
            path, params=params, headers={"Accept": "application/dicom+json"}
        )
        if response.status_code == 204 or not body.strip():
            return [], False
        rows = datasets_from_json(parse_json(body, url=response.url), url=response.url)
        for row in rows:
            self._fill_tree_keys(row, path)
        warning = response.headers.get("Warning", "")
        return rows, warning.startswith("299") and "additional results" in warning.lower()

    def _request(self, query: Query) -> tuple[str, list[tuple[str, object]]]:
        """The resource path and the query parameters for a Query."""
        level = query.query_level
        filters = dict(query.filters)
        study = filters.get("StudyInstanceUID")
        series = filters.get("SeriesInstanceUID")
        path = _RESOURCE[level]
        # Hierarchical paths where one study (and series) is given: every server supports them.
        if isinstance(study, str) and level is not QueryLevel.STUDY:
            filters.pop("StudyInstanceUID")
            path = f"studies/{study}/{_RESOURCE[level]}"
            if isinstance(series, str) and level is QueryLevel.INSTANCE:
                filters.pop("SeriesInstanceUID")
                path = f"studies/{study}/series/{series}/instances"
        params: list[tuple[str, object]] = []
        for keyword, value in filters.items():
            if isinstance(value, tuple):
                value = ",".join(value)  # several values are comma-separated (PS3.18 8.3.4.1)
            params.append((keyword, value))
        include = dict.fromkeys((*TREE_KEYS[level], *query.include_fields))
        params.extend(("includefield", keyword) for keyword in include)
        return path, params

    @staticmethod
    def _fill_tree_keys(row: Dataset, path: str) -> None:
        """Rows from hierarchical paths may omit the UIDs the path already gives."""
        parts = path.split("/")
        if len(parts) >= 3 and parts[0] == "studies" and "StudyInstanceUID" not in row:
            row.StudyInstanceUID = parts[1]
        if len(parts) >= 5 and parts[2] == "series" and "SeriesInstanceUID" not in row:
            row.SeriesInstanceUID = parts[3]

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()


def _row_key(row: Dataset) -> str:
    """What tells two rows apart when comparing pages (their UIDs, else their JSON)."""
    uids = [str(row.get(k, "")) for k in TREE_KEYS[QueryLevel.INSTANCE]]
    return "|".join(uids) if any(uids) else row.to_json(suppress_invalid_tags=True)
