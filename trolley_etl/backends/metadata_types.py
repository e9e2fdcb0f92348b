"""Names shared by metadata-only downloads, kept free of heavy imports (the manifest uses them)."""

from __future__ import annotations

from typing import Literal

#: How a metadata-only download stores each instance: Part 10 without pixel data, or DICOM JSON.
MetadataFormat = Literal["dicom", "json"]
METADATA_FORMATS: tuple[MetadataFormat, ...] = ("dicom", "json")
#: Asked for by a C-FIND metadata pull that names no keywords: what a cohort review looks at.
DEFAULT_METADATA_KEYWORDS = (
    "PatientID",
    "PatientName",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "ProtocolName",
    "BodyPartExamined",
    "SOPClassUID",
    "InstanceNumber",
    "ImageType",
    "AcquisitionDate",
    "ContentDate",
    "Manufacturer",
    "ManufacturerModelName",
    "StationName",
    "SliceThickness",
    "SpacingBetweenSlices",
    "PixelSpacing",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "KVP",
    "ContrastBolusAgent",
    "ImageOrientationPatient",
)
