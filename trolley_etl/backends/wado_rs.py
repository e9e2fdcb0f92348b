"""WADO-RS retrieval (DICOMweb, PS3.18 10.4): studies, series or instances, streamed.

Objects are asked for in their original transfer syntax (`transfer-syntax=*`), so the files
on disk are byte for byte what the archive holds. The multipart answer is parsed as it
arrives and each part goes straight to the sink.

With `metadata_only=True` each instance's header comes from `/metadata` instead, without
pixel data (see `wado_rs_metadata`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import requests

from trolley_etl.backends.dicom_json import datasets_from_json, parse_json
from trolley_etl.backends.http import (
    HttpSettings,
    http_settings,
    iter_body,
)
from trolley_etl.backends.metadata_types import MetadataFormat
from trolley_etl.backends.multipart import (
    boundary_from_content_type,
    stream_parts,
    stream_single,
)
from trolley_etl.core.backend import Downloader, InstanceSink
from trolley_etl.core.errors import ObjectNotFoundError, ResponseFormatError
from trolley_etl.core.model import (
    InstanceReference,
    QueryLevel,
    Reference,
    SeriesReference,
    Study,
    tree_from_rows,
)
from trolley_etl.core.uids import check_uid

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from trolley_etl.backends.http import HttpOptions


def resource_path(reference: Reference) -> str:
    """`studies/S[/series/SE[/instances/I]]` for a reference; every UID checked first, so
    no value can step outside the archive's base path (InvalidUidError otherwise)."""
    path = f"studies/{check_uid(reference.study_uid, 'StudyInstanceUID')}"
    if isinstance(reference, (SeriesReference, InstanceReference)):
        path += f"/series/{check_uid(reference.series_uid, 'SeriesInstanceUID')}"
    if isinstance(reference, InstanceReference):
        path += f"/instances/{check_uid(reference.instance_uid, 'SOPInstanceUID')}"
    return path


class WadoRS(Downloader):
    """Download from a DICOMweb server at study, series or instance level."""

    retrieval_level = None  # any level

    def __init__(
        self,
        url: str | HttpSettings,
        *,
        session: requests.Session | None = None,
        transfer_syntax: str = "*",
        metadata_only: bool = False,
        format: MetadataFormat = "dicom",
        **http: Unpack[HttpOptions],
    ) -> None:
        """`url` is the base URL (with `http` options) or whole HttpSettings; `session` a
        requests session of the caller's. `metadata_only`: headers only, from `/metadata`,
        stored as `format` ("dicom": Part 10 without pixel data; "json": DICOM JSON, which
        needs a StorageDir made with `file_format="json"`)."""
        self.http = http_settings(url, http).client(session)
        self.accept = (
            f'multipart/related; type="application/dicom"; transfer-syntax={transfer_syntax}'
        )
        self.metadata_only = metadata_only
        self.metadata_writer = None
        if metadata_only:
            from trolley_etl.backends.wado_rs_metadata import MetadataWriter

            self.metadata_writer = MetadataWriter(format)

    @property
    def file_format(self) -> str:
        """What the files this downloader stores are: "dicom" (Part 10) or "json"."""
        return self.metadata_writer.file_format if self.metadata_writer else "dicom"

    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        """Retrieve everything under `reference` (or its metadata) into `sink`; the count."""
        if self.metadata_writer is not None:
            return self._fetch_metadata(reference, sink)
        path = resource_path(reference)
        response = self.http.get(path, headers={"Accept": self.accept}, stream=True)
        url = self.http.url(path)
        with response:
            content_type = response.headers.get("Content-Type", "")
            chunks = iter_body(response, url)
            if content_type.startswith("application/dicom"):
                return stream_single(chunks, sink)
            boundary = boundary_from_content_type(content_type)
            if not content_type.startswith("multipart/related") or not boundary:
                raise ResponseFormatError(
                    f"{url}: expected multipart/related with a boundary, got {content_type!r}",
                    url=url,
                )
            return stream_parts(chunks, boundary, sink, url=url)

    def _fetch_metadata(self, reference: Reference, sink: InstanceSink) -> int:
        """Each instance's header from `/metadata`, streamed into the sink."""
        assert self.metadata_writer is not None
        path = f"{resource_path(reference)}/metadata"
        response = self.http.get(path, headers={"Accept": "application/dicom+json"}, stream=True)
        url = self.http.url(path)
        from trolley_etl.backends.wado_rs_metadata import expected_uids

        with response:
            return self.metadata_writer.stream(
                iter_body(response, url), url, sink, expected_uids(reference)
            )

    def drain_warnings(self) -> list[tuple[str, dict[str, Any]]]:
        """Warnings for the run log (values Part 10 could not hold), each reported once."""
        return self.metadata_writer.drain_warnings() if self.metadata_writer else []

    def metadata_tree(self, reference: Reference) -> Study:
        """The whole tree under a study or series, from WADO-RS `/metadata`."""
        if isinstance(reference, InstanceReference):
            reference = SeriesReference(reference.study_uid, reference.series_uid)
        path = f"{resource_path(reference)}/metadata"
        response, body = self.http.get_bounded(path, headers={"Accept": "application/dicom+json"})
        rows = datasets_from_json(parse_json(body, url=response.url), url=response.url)
        for row in rows:
            row.setdefault("StudyInstanceUID", reference.study_uid)
        studies = [
            s for s in tree_from_rows(rows, QueryLevel.INSTANCE) if s.uid == reference.study_uid
        ]
        if not studies:
            raise ObjectNotFoundError(
                f"{response.url}: no metadata for {reference}", url=response.url
            )
        return studies[0]

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()
