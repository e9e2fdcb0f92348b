"""One received file in, one de-identified file out; pixel data copied as bytes.

The header (everything before Pixel Data) is read with large values left on disk, changed
by the profile and written anew; the Pixel Data element is then copied from the received
file in bounded chunks, byte for byte (compressed or not), except where rectangles must be
blanked (uncompressed data only). Elements after Pixel Data (digital signatures, trailing
padding, private groups above 7FE0) are dropped, as the profile asks. Memory holds the
header and one chunk, whatever the size of a multi-frame object.
"""

from __future__ import annotations

import hashlib
import io
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from trolley_etl import __version__
from trolley_etl.core.errors import StorageError
from trolley_etl.deid import gate
from trolley_etl.deid.actions import Outcome, Policy, deidentify_dataset

CHUNK = 1 << 20
#: The header of one instance (all but pixel data) is held in memory: refuse absurd ones.
MAX_HEADER_BYTES = 64 << 20
#: A deflated data set cannot be copied piecewise; it is de-identified whole, up to this size.
MAX_DEFLATED_BYTES = 256 << 20
DEFER_SIZE = 64 * 1024
#: Long VRs: 2 reserved bytes and a 4-byte length in explicit VR.
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UC", b"UR", b"UT", b"UN"}
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD


@dataclass
class FileResult:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    quarantined: str = ""  # the reason, when the instance was held back
    size: int = 0
    sha256: str = ""
    new_sop_instance_uid: str = ""
    outcome: Outcome = field(default_factory=Outcome)


class _HashingWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.write(data)
        self.hash.update(data)
        self.size += len(data)


def deidentify_file(
    source: Path,
    out: BinaryIO,
    policy: Policy,
    *,
    allow_burned_in: bool = False,
    devices: tuple[gate.DeviceRegions, ...] = (),
) -> FileResult:
    """Write the de-identified form of `source` to `out`, or write nothing and say why not."""
    with source.open("rb") as handle:
        try:
            ds = pydicom.dcmread(handle, defer_size=DEFER_SIZE, stop_before_pixels=True)
        except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
            raise StorageError(f"received object is not valid DICOM Part 10: {exc}") from None
        pixel_at = handle.tell()
        syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)))
        if syntax == DeflatedExplicitVRLittleEndian:
            return _deflated(source, out, policy, allow_burned_in, devices)
        if pixel_at > MAX_HEADER_BYTES:
            raise StorageError(f"header of {pixel_at} bytes is larger than {MAX_HEADER_BYTES}")
        result = _facts(ds)
        verdict = gate.check(ds, result.sop_class_uid, allow=allow_burned_in, devices=devices)
        regions = verdict.regions
        if verdict.at_risk and regions and syntax.is_compressed:
            result.quarantined = f"{verdict.reason}; regions to blank need uncompressed pixels"
            return result
        if verdict.at_risk and not regions:
            result.quarantined = verdict.reason
            return result
        geometry = _Geometry.of(ds) if regions else None
        writer = _HashingWriter(out)
        result.outcome = deidentify_dataset(ds, policy)
        _write_header(ds, syntax, writer)
        handle.seek(pixel_at)
        trailing = _copy_pixel_element(handle, writer, syntax, geometry, regions)
        if trailing:
            result.outcome.counts[("removed", "(elements after Pixel Data)")] += 1
    result.size, result.sha256 = writer.size, writer.hash.hexdigest()
    result.new_sop_instance_uid = str(ds.get("SOPInstanceUID", ""))
    return result


def _facts(ds: Dataset) -> FileResult:
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    return FileResult(
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=sop_class,
    )


def _file_meta(ds: Dataset, syntax: UID) -> FileMetaDataset:
    """A fresh file meta: nothing of the sender (AE titles, private meta) is carried over."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.get("SOPClassUID", "")))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.get("SOPInstanceUID", "")))
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"TROLLEY_{__version__}"[:16]
    return meta


def _write_header(ds: Dataset, syntax: UID, writer: _HashingWriter) -> None:
    ds.file_meta = _file_meta(ds, syntax)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    writer.write(buffer.getbuffer())


def _deflated(
    source: Path,
    out: BinaryIO,
    policy: Policy,
    allow: bool,
    devices: tuple[gate.DeviceRegions, ...],
) -> FileResult:
    """Deflated data sets are rare and small: read, change and write them whole."""
    if source.stat().st_size > MAX_DEFLATED_BYTES:
        raise StorageError(f"deflated object larger than {MAX_DEFLATED_BYTES} bytes")
    ds = pydicom.dcmread(source)
    result = _facts(ds)
    verdict = gate.check(ds, result.sop_class_uid, allow=allow, devices=devices)
    if verdict.at_risk:
        result.quarantined = verdict.reason + ("; deflated" if verdict.regions else "")
        return result
    result.outcome = deidentify_dataset(ds, policy)
    writer = _HashingWriter(out)
    _write_header(ds, DeflatedExplicitVRLittleEndian, writer)
    result.size, result.sha256 = writer.size, writer.hash.hexdigest()
    result.new_sop_instance_uid = str(ds.get("SOPInstanceUID", ""))
    return result


@dataclass(frozen=True)
class _Geometry:
    """Where a pixel row lies in uncompressed pixel data."""

    rows: int
    columns: int
    pixel_bytes: int  # bytes per pixel of one plane
    planes: int  # 1, or samples per pixel when planar (colour by plane)
    samples_interleaved: int  # samples per pixel stored side by side

    @classmethod
    def of(cls, ds: Dataset) -> _Geometry:
        bits = int(ds.get("BitsAllocated", 8) or 8)
        if bits % 8:
            raise StorageError(f"cannot blank regions in {bits}-bit pixel data")
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        planar = int(ds.get("PlanarConfiguration", 0) or 0) == 1 and samples > 1
        return cls(
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            pixel_bytes=bits // 8,
            planes=samples if planar else 1,
            samples_interleaved=1 if planar else samples,
        )

    @property
    def row_bytes(self) -> int:
        return self.columns * self.pixel_bytes * self.samples_interleaved


def _copy_pixel_element(
    handle: BinaryIO,
    writer: _HashingWriter,
    syntax: UID,
    geometry: _Geometry | None,
    regions: tuple[tuple[int, int, int, int], ...],
) -> bool:
    """Copy the Pixel Data element at the handle; True if elements followed it (dropped)."""
    little = syntax != ExplicitVRBigEndian
    explicit = syntax != ImplicitVRLittleEndian
    order = "<" if little else ">"
    head = handle.read(8)
    if len(head) < 8:
        return False  # no pixel data
    group, element = struct.unpack(order + "HH", head[:4])
    if group != 0x7FE0 or element not in (0x0008, 0x0009, 0x0010):
        raise StorageError(f"expected pixel data, found ({group:04X},{element:04X})")
    if explicit and head[4:6] in _LONG_VRS:
        head += _read_exact(handle, 4)
        length = struct.unpack(order + "I", head[8:12])[0]
    elif explicit:
        length = struct.unpack(order + "H", head[6:8])[0]
    else:
        length = struct.unpack(order + "I", head[4:8])[0]
    writer.write(head)
    if length == 0xFFFFFFFF:  # encapsulated: items until the sequence delimiter
        while True:
            item = _read_exact(handle, 8)
            writer.write(item)
            item_tag = (struct.unpack(order + "H", item[:2])[0] << 16) | struct.unpack(
                order + "H", item[2:4]
            )[0]
            item_length = struct.unpack(order + "I", item[4:8])[0]
            if item_tag == _SEQ_END:
                break
            if item_tag != _ITEM or item_length == 0xFFFFFFFF:
                raise StorageError("malformed encapsulated pixel data")
            _copy(handle, writer, item_length)
    elif geometry is not None and regions:
        _copy_blanked(handle, writer, length, geometry, regions)
    else:
        _copy(handle, writer, length)
    return bool(handle.read(1))


def _read_exact(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise StorageError("received object ends inside its pixel data")
    return data


def _copy(handle: BinaryIO, writer: _HashingWriter, length: int) -> None:
    left = length
    while left:
        chunk = _read_exact(handle, min(CHUNK, left))
        writer.write(chunk)
        left -= len(chunk)


def _copy_blanked(
    handle: BinaryIO,
    writer: _HashingWriter,
    length: int,
    geometry: _Geometry,
    regions: tuple[tuple[int, int, int, int], ...],
) -> None:
    """Copy uncompressed pixels row by row, zeroing the bytes inside the rectangles."""
    row_bytes = geometry.row_bytes
    unit = geometry.pixel_bytes * geometry.samples_interleaved
    rows_total = length // row_bytes if row_bytes else 0
    for index in range(rows_total):
        row = bytearray(_read_exact(handle, row_bytes))
        y = index % geometry.rows
        for x, top, width, height in regions:
            if top <= y < top + height:
                start, stop = max(0, x) * unit, min(geometry.columns, x + width) * unit
                if stop > start:
                    row[start:stop] = bytes(stop - start)
        writer.write(row)
    _copy(handle, writer, length - rows_total * row_bytes)  # padding byte, if any
