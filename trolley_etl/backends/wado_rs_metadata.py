"""WADO-RS metadata-only retrieval: every instance's header, without pixel data.

A `/metadata` answer is one JSON array holding every instance under a study or series; for a
large study it runs to hundreds of megabytes. It is parsed incrementally (ijson) and each
instance goes to the sink as soon as its object closes, so memory holds one instance at a time.
An instance larger than MAX_INSTANCE_BYTES, an answer that is not a JSON array and broken JSON
are ResponseFormatErrors that name the URL, never a raw decoder traceback.

Two file formats:

- `dicom` (the default): Part 10 without pixel data, which `pydicom.dcmread` and every
  trolley-etl command read. Values pydicom cannot write (such as Vitrea's private `UN` elements
  whose JSON value is a list of objects) are dropped and counted; bulk data references
  (`BulkDataURI`) are left out, since fetching them is what metadata-only avoids.
- `json`: the archive's DICOM JSON object of the instance, nothing dropped.
"""

from __future__ import annotations

import io
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from trolley_etl.backends.metadata_types import METADATA_FORMATS, MetadataFormat
from trolley_etl.core.backend import InstanceSink, write_instance
from trolley_etl.core.errors import ConfigurationError, ResponseFormatError

#: Largest JSON object of one instance that is accepted (it is held in memory while parsed).
MAX_INSTANCE_BYTES = 64 << 20
#: What the JSON of one element may hold besides "vr" (PS3.18 F.2.2).
_VALUE_KEYS = ("Value", "BulkDataURI", "InlineBinary")
_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
SOP_INSTANCE_UID_TAG = "00080018"
_PIXEL_TAGS = frozenset({"7FE00008", "7FE00009", "7FE00010"})
_END = object()
#: The SOP class given to an instance whose metadata names none.
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


class _BoundedReader:
    """The body as a file for ijson; refuses an answer that is not an array, and one instance
    that grows past MAX_INSTANCE_BYTES before its object closes."""

    def __init__(self, chunks: Iterator[bytes], url: str) -> None:
        self._chunks = chunks
        self._url = url
        self._pending = b""
        self._offset = 0  # how much of _pending was read
        self.started = False
        self.position = 0
        self.mark = 0  # where the instance being parsed started, roughly

    def read(self, size: int = -1) -> bytes:
        if self.position - self.mark > MAX_INSTANCE_BYTES:
            raise ResponseFormatError(
                f"{self._url}: one instance's metadata is larger than "
                f"{MAX_INSTANCE_BYTES >> 20} MiB; refusing to hold it in memory",
                url=self._url,
            )
        while self._offset >= len(self._pending):
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._pending, self._offset = chunk, 0
            if not self.started:
                self._check_start()
        end = len(self._pending) if size is None or size < 0 else self._offset + size
        data = self._pending[self._offset : end]  # one copy of what is read, not of the rest
        self._offset += len(data)
        self.position += len(data)
        return data

    def _check_start(self) -> None:
        text = self._pending.lstrip()
        if not text:
            self._pending = b""
            return
        self.started = True
        if not text.startswith(b"["):
            raise ResponseFormatError(
                f"{self._url}: expected a DICOM JSON array of instances, got {_preview(text)!r}",
                url=self._url,
            )


def _preview(data: bytes, limit: int = 60) -> str:
    text = " ".join(data[:limit].decode("utf-8", "replace").split())
    return text + ("..." if len(data) > limit else "")


def iter_instances(chunks: Iterator[bytes], url: str) -> Iterator[dict[str, Any]]:
    """Each instance object of a DICOM JSON array, as the array streams in."""
    import ijson  # only metadata-only pulls need it

    reader = _BoundedReader(chunks, url)
    items = ijson.items(reader, "item", use_float=True)
    while True:
        try:
            item = next(items, _END)
        except ijson.JSONError as exc:
            if not reader.started:
                raise ResponseFormatError(f"{url}: the metadata answer is empty", url=url) from None
            raise ResponseFormatError(
                f"{url}: the metadata answer is not valid JSON (near byte {reader.position}): "
                f"{_short(exc)}",
                url=url,
            ) from None
        if item is _END and not reader.started:
            raise ResponseFormatError(f"{url}: the metadata answer is empty", url=url)
        if item is _END:
            return
        check_instance(item, url)
        assert isinstance(item, dict)
        yield item
        reader.mark = reader.position


def _short(exc: BaseException, limit: int = 120) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_instance(item: Any, url: str) -> None:
    """The shape PS3.18 F.2 gives one instance: tags mapping to objects with a "vr"."""
    if not isinstance(item, dict):
        raise ResponseFormatError(
            f"{url}: expected a DICOM JSON object per instance, got {type(item).__name__}",
            url=url,
        )
    for tag, element in item.items():
        if not _TAG.match(tag) or not isinstance(element, dict):
            raise ResponseFormatError(f"{url}: not a DICOM JSON element: {tag!r}", url=url)
        if not isinstance(element.get("vr"), str):
            raise ResponseFormatError(f"{url}: element {tag} has no VR", url=url)
    uid = instance_uid(item)
    if not uid:
        raise ResponseFormatError(f"{url}: an instance has no SOPInstanceUID", url=url)


def check_belongs(item: dict[str, Any], expect: dict[str, str], url: str) -> None:
    """The instance has the UIDs of the reference it was asked for."""
    for tag, uid in expect.items():
        value = item.get(tag, {}).get("Value")
        if not (isinstance(value, list) and value == [uid]):
            raise ResponseFormatError(
                f"{url}: the archive answered with an instance of another object "
                f"({tag} is {value!r}, expected {uid})",
                url=url,
            )


#: Tags of the UIDs a reference names, from the study down.
REFERENCE_TAGS = ("0020000D", "0020000E", SOP_INSTANCE_UID_TAG)


def expected_uids(reference: Any) -> dict[str, str]:
    """What every instance answered for `reference` must carry, as tag -> UID."""
    uids = [
        reference.study_uid,
        getattr(reference, "series_uid", ""),
        getattr(reference, "instance_uid", ""),
    ]
    return {tag: uid for tag, uid in zip(REFERENCE_TAGS, uids, strict=True) if uid}


def instance_uid(item: dict[str, Any]) -> str:
    """SOPInstanceUID of an instance object, or "" when it has none."""
    value = item.get(SOP_INSTANCE_UID_TAG, {}).get("Value")
    if isinstance(value, list) and value and isinstance(value[0], str):
        return value[0]
    return ""


def json_bytes(item: dict[str, Any]) -> bytes:
    """One instance as a DICOM JSON file (UTF-8, compact, keys in the archive's order)."""
    return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _ignore_bulk_data(tag: str, vr: str, uri: str) -> bytes:
    return b""


def part10_bytes(item: dict[str, Any]) -> tuple[bytes, list[str]]:
    """One instance as Part 10 without pixel data, and the tags of values that were dropped
    because pydicom cannot hold or write them."""
    from pydicom import Dataset
    from pydicom.dataelem import DataElement

    dataset = Dataset()
    dropped: list[str] = []
    for tag, element in item.items():
        tag = tag.upper()
        if tag.startswith("0002") or tag in _PIXEL_TAGS or "BulkDataURI" in element:
            continue  # file meta is rebuilt below; bulk data is what metadata-only leaves out
        keys = [key for key in _VALUE_KEYS if key in element]
        try:
            if not keys:  # present without a value (a C-FIND key the archive left empty)
                dataset.add(DataElement(int(tag, 16), element["vr"], None))
                continue
            converted = DataElement.from_json(
                Dataset, tag, element["vr"], element[keys[0]], keys[0], _ignore_bulk_data
            )
            if converted.VR == "UN" and not isinstance(converted.value, (bytes, str)):
                dropped.append(tag)  # Vitrea's UN holding objects: known unwritable, skip early
                continue
            dataset.add(converted)
        except Exception:  # whatever pydicom refuses is dropped and counted, never fatal
            dropped.append(tag)
    try:
        return _write(dataset), dropped
    except Exception:
        pass
    for element in list(dataset):  # find the elements that cannot be written, one by one
        single = Dataset()
        single.add(element)
        try:
            _encode(single)
        except Exception:
            del dataset[element.tag]
            dropped.append(f"{element.tag:08X}")
    return _write(dataset), dropped


def _encode(dataset: Any) -> None:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)


def _write(dataset: Any) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(dataset.get("SOPClassUID") or SECONDARY_CAPTURE)
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta
    dataset.SpecificCharacterSet = "ISO_IR 192"  # DICOM JSON is Unicode: written as UTF-8
    buffer = io.BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


class MetadataWriter:
    """Writes instance objects into a sink in one format; counts what Part 10 had to drop.

    Shared by the download threads of a run: the counters are guarded by a lock.
    """

    def __init__(self, file_format: MetadataFormat = "dicom") -> None:
        if file_format not in METADATA_FORMATS:
            raise ConfigurationError(f"format must be one of {', '.join(METADATA_FORMATS)}")
        self.file_format = file_format
        #: Tag -> how many values of it were dropped from Part 10 files.
        self.dropped_elements: Counter[str] = Counter()
        #: Instances that lost at least one value.
        self.instances_with_drops = 0
        self._lock = threading.Lock()
        self._reported: Counter[str] = Counter()

    def write(self, item: dict[str, Any], sink: InstanceSink) -> None:
        if self.file_format == "json":
            write_instance(sink, json_bytes(item))
            return
        data, dropped = part10_bytes(item)
        if dropped:
            with self._lock:
                self.dropped_elements.update(dropped)
                self.instances_with_drops += 1
        write_instance(sink, data)

    def stream(
        self,
        chunks: Iterator[bytes],
        url: str,
        sink: InstanceSink,
        expect: dict[str, str] | None = None,
    ) -> int:
        """Every instance of a `/metadata` answer into the sink; how many there were.

        `expect` maps tags to the UIDs every instance must have (those of the reference asked
        for): an archive answering with another study's instances is a ResponseFormatError.
        An instance listed twice counts once (it is stored once, under its UID).
        """
        seen: set[str] = set()
        for item in iter_instances(chunks, url):
            check_belongs(item, expect or {}, url)
            self.write(item, sink)
            seen.add(instance_uid(item))
        return len(seen)

    def drain_warnings(self) -> list[tuple[str, dict[str, Any]]]:
        """Warnings not yet reported, as (event, fields): the values dropped since last time."""
        with self._lock:
            new = self.dropped_elements - self._reported
            self._reported = self.dropped_elements.copy()
        if not new:
            return []
        return [
            (
                "metadata.values_dropped",
                {
                    "values": sum(new.values()),
                    "tags": dict(new.most_common(20)),
                    "reason": "pydicom cannot write them to Part 10; format: json keeps them",
                },
            )
        ]
