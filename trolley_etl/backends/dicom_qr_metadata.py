"""Metadata-only pulls from DICOM Query/Retrieve archives: an instance-level C-FIND.

A DICOM archive has no `/metadata`; what comes closest is a C-FIND at instance level that asks
for the keywords a cohort review needs (protocol, series description, slice thickness, scanner
model, ...). Each answer row becomes one file, written like WADO-RS metadata (`MetadataWriter`):
Part 10 without pixel data by default, or DICOM JSON. Archives answer only the keys they know;
an asked-for key an archive cannot answer comes back empty.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from trolley_etl.backends.dicom_qr import DicomQR
from trolley_etl.backends.dimse import DimseSettings, dimse_settings
from trolley_etl.backends.metadata_types import DEFAULT_METADATA_KEYWORDS, MetadataFormat
from trolley_etl.backends.wado_rs_metadata import (
    SOP_INSTANCE_UID_TAG,
    MetadataWriter,
    check_belongs,
    expected_uids,
)
from trolley_etl.core.backend import Downloader, InstanceSink
from trolley_etl.core.errors import ResponseFormatError
from trolley_etl.core.model import InstanceReference, QueryLevel, Reference, SeriesReference
from trolley_etl.core.query import Query, check_keyword

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from trolley_etl.backends.dimse import DimseOptions

#: Query/Retrieve attributes of the answer, not of the instance: left out of the files.
_RESPONSE_ONLY_TAGS = ("00080052", "00080054", "00080056")


class DicomQRMetadata(Downloader):
    """The headers of the instances under a reference, from an instance-level C-FIND."""

    retrieval_level = None  # a C-FIND can be made for a study, a series or an instance

    def __init__(
        self,
        host: str | DimseSettings,
        port: int | None = None,
        called_aet: str | None = None,
        calling_aet: str = "TROLLEY",
        *,
        keywords: Sequence[str] = DEFAULT_METADATA_KEYWORDS,
        format: MetadataFormat = "dicom",
        uid_list_matching: bool = True,
        **dimse: Unpack[DimseOptions],
    ) -> None:
        """`host` names the archive (with `port`, `called_aet` and `dimse` options), or is
        whole DimseSettings."""
        for keyword in keywords:
            check_keyword(keyword)
        self.keywords = tuple(dict.fromkeys(keywords))
        settings = dimse_settings(host, port, called_aet, calling_aet, dimse)
        self.finder = DicomQR(settings, uid_list_matching=uid_list_matching)
        self.metadata_writer = MetadataWriter(format)

    @property
    def file_format(self) -> str:
        """What the stored files are: `dicom` (Part 10 headers) or `json`."""
        return self.metadata_writer.file_format

    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        """Write the header of every instance under `reference` to `sink`; the count."""
        filters: dict[str, Any] = {"StudyInstanceUID": reference.study_uid}
        if isinstance(reference, (SeriesReference, InstanceReference)):
            filters["SeriesInstanceUID"] = reference.series_uid
        if isinstance(reference, InstanceReference):
            filters["SOPInstanceUID"] = reference.instance_uid
        query = Query(
            query_level=QueryLevel.INSTANCE, filters=filters, include_fields=self.keywords
        )
        seen: set[str] = set()
        url = self.finder.settings.url
        expect = expected_uids(reference)
        for row in self.finder.iter_rows(query):
            item = row.to_json_dict(bulk_data_threshold=1 << 30)
            for tag in _RESPONSE_ONLY_TAGS:
                item.pop(tag, None)
            uid = (item.get(SOP_INSTANCE_UID_TAG, {}).get("Value") or [""])[0]
            if not uid:
                raise ResponseFormatError(f"{url}: a C-FIND answer has no SOPInstanceUID", url=url)
            check_belongs(item, expect, url)
            self.metadata_writer.write(item, sink)
            seen.add(uid)
        return len(seen)

    def drain_warnings(self) -> list[tuple[str, dict[str, Any]]]:
        """The warnings gathered since the last call (event name and fields), then forgets them."""
        return self.metadata_writer.drain_warnings()
