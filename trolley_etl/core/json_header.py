"""The header values storing needs, read from a DICOM JSON file (metadata-only pulls).

The counterpart of `header_scan` for files that hold one instance's DICOM JSON object
(PS3.18 F.2) instead of Part 10: the same HeaderFacts, so paths, the checkpoint and the audit
report treat both kinds of file alike.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword

from trolley_etl.core.errors import StorageError
from trolley_etl.core.header_scan import HeaderFacts, HeaderValue

#: A stored JSON file larger than this is not read back (the download refuses such instances).
MAX_JSON_BYTES = 64 << 20
_AVAILABLE_TRANSFER_SYNTAX = "00083002"


def looks_like_json(prefix: bytes | None) -> bool:
    """True when a received object starts like a JSON object rather than Part 10."""
    return bool(prefix) and prefix.lstrip()[:1] == b"{"  # type: ignore[union-attr]


def json_header_facts(
    path: Path, keywords: Iterable[str], prefix: bytes | None = None, size: int = -1
) -> HeaderFacts:
    """The `keywords` of a DICOM JSON file; StorageError if it is not one instance's object."""
    if prefix is not None and 0 <= size <= len(prefix):
        data = prefix
    else:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise StorageError(f"DICOM JSON file larger than {MAX_JSON_BYTES >> 20} MiB: {path}")
        data = path.read_bytes()
    try:
        item = json.loads(data)
    except ValueError as exc:
        raise StorageError(f"received object is not valid DICOM JSON: {exc}") from None
    if not isinstance(item, dict):
        raise StorageError("received object is not a DICOM JSON object")
    values: dict[str, HeaderValue] = {}
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        element = item.get(f"{tag:08X}") if tag is not None else None
        texts = _texts(element)
        if texts:
            values[keyword] = texts[0] if len(texts) == 1 else tuple(texts)
    syntax = _texts(item.get(_AVAILABLE_TRANSFER_SYNTAX))
    return HeaderFacts(
        transfer_syntax=syntax[0] if syntax else "",
        media_storage_sop_class=str(values.get("SOPClassUID", "")),
        values=values,
    )


def _texts(element: Any) -> list[str]:
    """The values of one JSON element as text (person names by their alphabetic form)."""
    if not isinstance(element, dict) or not isinstance(element.get("Value"), list):
        return []
    texts = []
    for value in element["Value"]:
        if isinstance(value, dict):
            value = value.get("Alphabetic", "")
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            texts.append(str(value))
    return texts


def read_json_dataset(path: Path) -> Any:
    """A stored DICOM JSON file as a pydicom Dataset (bulk data references left empty), for
    readers of stored files (`metadata`, de-identification) that also meet metadata-only pulls."""
    from pydicom import Dataset

    if path.stat().st_size > MAX_JSON_BYTES:
        raise StorageError(f"DICOM JSON file larger than {MAX_JSON_BYTES >> 20} MiB: {path}")
    try:
        return Dataset.from_json(path.read_text("utf-8"), lambda *_: b"")
    except (ValueError, TypeError, KeyError) as exc:
        raise StorageError(f"{path}: not a DICOM JSON object: {exc}") from None


def is_json_file(path: Path) -> bool:
    """True for a stored DICOM JSON file (metadata-only pull with format json)."""
    with path.open("rb") as handle:
        return looks_like_json(handle.read(64))
