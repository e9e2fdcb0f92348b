"""The DICOM JSON model (PS3.18 F.2), as QIDO-RS and WADO-RS metadata answer."""

from __future__ import annotations

from typing import Any

from pydicom import Dataset

from trolley_etl.core.errors import ResponseFormatError


def _ignore_bulk_data(tag: str, vr: str, uri: str) -> bytes:
    return b""  # search results never need pixel data or other bulk values


def datasets_from_json(payload: Any, *, url: str) -> list[Dataset]:
    """Parse a DICOM JSON array into Datasets; anything else is a ResponseFormatError."""
    if not isinstance(payload, list):
        raise ResponseFormatError(f"{url}: expected a DICOM JSON array", url=url)
    try:
        return [
            Dataset.from_json(item, bulk_data_uri_handler=_ignore_bulk_data) for item in payload
        ]
    except (TypeError, ValueError, KeyError) as exc:
        raise ResponseFormatError(f"{url}: invalid DICOM JSON: {exc}", url=url) from None
