"""Names shared by metadata-only downloads, kept free of heavy imports (the manifest uses them)."""

from __future__ import annotations

from typing import Literal

#: How a metadata-only download stores each instance: Part 10 without pixel data, or DICOM JSON.
MetadataFormat = Literal["dicom", "json"]
METADATA_FORMATS: tuple[MetadataFormat, ...] = ("dicom", "json")
