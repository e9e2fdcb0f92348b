"""The DICOM JSON model (PS3.18 F.2), as QIDO-RS and WADO-RS metadata answer."""

from __future__ import annotations

import json
from typing import Any

from pydicom import Dataset

from trolley_etl.core.errors import ResponseFormatError


def _ignore_bulk_data(tag: str, vr: str, uri: str) -> bytes:
    return b""  # search results never need pixel data or other bulk values


def parse_json(body: bytes, *, url: str) -> Any:
    """JSON from an archive's answer; garbage (or 5,000 nested arrays) is a ResponseFormatError."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ResponseFormatError(f"{url}: the answer is not JSON", url=url) from None


def datasets_from_json(payload: Any, *, url: str) -> list[Dataset]:
    """Parse a DICOM JSON array into Datasets; anything else is a ResponseFormatError.

    Each item must be an object; whatever pydicom cannot make of one (wrong types, bad
    tags, absurd nesting) is reported with its index, never raised as a traceback.
    """
    if not isinstance(payload, list):
        raise ResponseFormatError(f"{url}: expected a DICOM JSON array", url=url)
    datasets = []
    for index, item in enumerate(payload):
        if not isinstance(item, dict):
            raise ResponseFormatError(
                f"{url}: invalid DICOM JSON: item {index} is {type(item).__name__}, not an object",
                url=url,
            )
        try:
            datasets.append(Dataset.from_json(item, bulk_data_uri_handler=_ignore_bulk_data))
        except Exception as exc:  # pydicom raises many kinds for malformed input
            reason = " ".join(str(exc).split())[:200]
            raise ResponseFormatError(
                f"{url}: invalid DICOM JSON in item {index}: {reason}", url=url
            ) from None
    return datasets
