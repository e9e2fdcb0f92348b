"""WADO-URI retrieval (PS3.18 9): one instance per request.

It can only fetch instances, so a study or series given to it goes through the Trolley's
instance fallback (the searcher lists the instances first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import requests

from trolley_etl.backends.http import (
    HttpSettings,
    http_settings,
    iter_body,
)
from trolley_etl.backends.multipart import stream_single
from trolley_etl.core.backend import Downloader, InstanceSink
from trolley_etl.core.errors import MissingReferencesError
from trolley_etl.core.model import InstanceReference, QueryLevel, Reference
from trolley_etl.core.uids import check_uid

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from trolley_etl.backends.http import HttpOptions


class WadoURI(Downloader):
    """Download single instances with `?requestType=WADO&...&contentType=application/dicom`."""

    retrieval_level = QueryLevel.INSTANCE

    def __init__(
        self,
        url: str | HttpSettings,
        *,
        session: requests.Session | None = None,
        transfer_syntax: str | None = None,
        **http: Unpack[HttpOptions],
    ) -> None:
        """`url` is the base URL (with `http` options) or whole HttpSettings."""
        self.http = http_settings(url, http).client(session)
        self.transfer_syntax = transfer_syntax

    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        """Retrieve one instance into `sink` (WADO-URI names instances only); the count."""
        if not isinstance(reference, InstanceReference):
            raise MissingReferencesError(
                QueryLevel.INSTANCE, f"WADO-URI retrieves single instances, not {reference}"
            )
        params: dict[str, object] = {
            "requestType": "WADO",
            "studyUID": check_uid(reference.study_uid, "StudyInstanceUID"),
            "seriesUID": check_uid(reference.series_uid, "SeriesInstanceUID"),
            "objectUID": check_uid(reference.instance_uid, "SOPInstanceUID"),
            "contentType": "application/dicom",
        }
        if self.transfer_syntax:
            params["transferSyntax"] = self.transfer_syntax
        response = self.http.get("", params=params, stream=True)
        with response:
            return stream_single(iter_body(response, response.url), sink)

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()
