"""Saving received DICOM objects to disk, atomically, in a UID-based folder layout.

Bytes are written exactly as the archive sent them (no decoding, no transcoding) to a temporary
file under `ROOT/.trolley/tmp/` (same file system as the data, so the final rename is atomic),
hashed on the way, fsynced, then renamed into the path the layout template gives. Values from
DICOM headers are sanitised before they become path components, so that no archive, however
hostile, can make us write outside the root.
"""

from __future__ import annotations

import hashlib
import os
import re
import string
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from trolley_etl.core.errors import QueryError, StorageError
from trolley_etl.core.query import check_keyword

DEFAULT_LAYOUT = "{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
#: Used in a path where the dataset has no value for a layout keyword.
MISSING_VALUE = "unknown"
#: Longest path component made from a tag value, in characters.
MAX_COMPONENT_LENGTH = 100
#: Header attributes every stored file is described by (paths, checkpoint, audit report).
HEADER_KEYWORDS = frozenset(
    {
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
        "PatientID", "AccessionNumber", "StudyDate",
    }
)  # fmt: skip
#: Folder under the root that trolley-etl owns (temp files, checkpoint, logs, reports).
STATE_DIR = ".trolley"

_UNSAFE = re.compile(r"[^\w.\-^+=@,()]", re.UNICODE)


def sanitise_component(value: str, max_length: int = MAX_COMPONENT_LENGTH) -> str:
    """Make one tag value safe as a single path component.

    Separators, control characters and anything outside a conservative set become `_`;
    a leading dot becomes `_` (so neither `..` nor hidden files); over-long values are cut and
    suffixed with a short hash so that two long values stay distinct.
    """
    text = unicodedata.normalize("NFC", value).strip()
    text = "".join("_" if unicodedata.category(ch).startswith("C") else ch for ch in text)
    text = _UNSAFE.sub("_", text)
    text = re.sub(r"^\.", "_", text).rstrip(". ")
    if not text:
        return MISSING_VALUE
    if len(text) > max_length:
        digest = hashlib.sha1(value.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        text = f"{text[: max_length - 9]}_{digest}"
    return text


def _value_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return ""  # binary values make no sense in a path
    if isinstance(value, (MultiValue, list, tuple)):
        return "_".join(_value_text(v) for v in value)
    return str(value)


class LayoutTemplate:
    """A relative path template such as `{PatientID}/{StudyDate}/{SOPInstanceUID}.dcm`.

    Fields are DICOM keywords; the template is checked when it is built (unknown keywords,
    unbalanced braces, absolute paths, `..`), and each filled-in value is sanitised.
    """

    def __init__(self, template: str = DEFAULT_LAYOUT) -> None:
        self.template = template
        self.parts: list[list[tuple[str, str | None]]] = []  # per path component: (text, field)
        if not template or template.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", template):
            raise QueryError(f"layout {template!r} must be a non-empty relative path")
        for component in template.split("/"):
            self.parts.append(self._parse_component(component))
        if not any(name for _, name in self.parts[-1]):
            raise QueryError(f"layout {template!r}: the file name must contain a {{Keyword}}")

    def _parse_component(self, component: str) -> list[tuple[str, str | None]]:
        where = f"layout {self.template!r}"
        if component in ("", ".", ".."):
            raise QueryError(f"{where}: empty, '.' or '..' path components are not allowed")
        if "\\" in component:
            raise QueryError(f"{where}: use '/' as the separator")
        try:
            pieces = list(string.Formatter().parse(component))
        except ValueError as exc:
            raise QueryError(f"{where}: {exc} (unbalanced braces?)") from None
        parsed: list[tuple[str, str | None]] = []
        for literal, name, spec, conversion in pieces:
            if name is not None:
                if spec or conversion:
                    raise QueryError(f"{where}: format specs are not supported in {{{name}}}")
                try:
                    check_keyword(name)
                except QueryError as exc:
                    raise QueryError(f"{where}: {exc}") from None
            parsed.append((literal, name or None))
        return parsed

    @property
    def keywords(self) -> list[str]:
        return [name for part in self.parts for _, name in part if name]

    def render(self, dataset: Dataset) -> Path:
        """The relative path for a dataset; every component is safe."""
        components = []
        for part in self.parts:
            text = ""
            for literal, name in part:
                text += literal
                if name:
                    text += _value_text(dataset.get(name)) or MISSING_VALUE
            components.append(sanitise_component(text))
        return Path(*components)


@dataclass(frozen=True)
class StoredInstance:
    """What was written: where, and the facts an audit needs."""

    path: Path
    relative_path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    size: int
    sha256: str
    #: Header values for the audit report, read when the file was committed.
    modality: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""


class StorageDir:
    """Stores DICOM objects under `root` in `layout`. Safe to share between threads."""

    def __init__(self, root: str | os.PathLike[str], layout: str = DEFAULT_LAYOUT) -> None:
        self.root = Path(root).absolute()
        self.layout = LayoutTemplate(layout)
        self.tmp_dir = self.root / STATE_DIR / "tmp"
        #: What commit reads from each header: the layout's keywords and the audit facts.
        self.header_keywords = sorted({*HEADER_KEYWORDS, *self.layout.keywords})
        self._ready_folders: set[Path] = set()  # created and checked in this process

    def open_instance(self) -> StagedFile:
        """A writer for one object; nothing appears in the layout until it is committed."""
        if self.tmp_dir not in self._ready_folders:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            self._ready_folders.add(self.tmp_dir)
        return StagedFile(self)

    def path_for(self, dataset: Dataset) -> Path:
        """Absolute path for a dataset, proven to stay under the root."""
        relative = self.layout.render(dataset)
        target = self.root / relative
        if os.path.commonpath([self.root, target]) != str(self.root):
            raise StorageError(f"refusing to write outside {self.root}: {relative}")
        return target

    def _make_parent(self, target: Path) -> None:
        """Create the folders of `target` one by one, refusing symlinks planted in the tree.

        Folders already created and checked by this process are not checked again: a study's
        hundreds of instances share one folder.
        """
        if target.parent not in self._ready_folders:
            current = self.root
            current.mkdir(parents=True, exist_ok=True)
            for name in target.relative_to(self.root).parts[:-1]:
                current = current / name
                if current.is_symlink():
                    raise StorageError(f"refusing to follow a symlink inside the output: {current}")
                current.mkdir(exist_ok=True)
            self._ready_folders.add(target.parent)
        if target.is_symlink():
            raise StorageError(f"refusing to replace a symlink inside the output: {target}")

    def commit(
        self, staged: Path, size: int, sha256: str, *, sync_dir: bool = True
    ) -> StoredInstance:
        """Move a complete, fsynced temp file into its place in the layout.

        `sync_dir=False` leaves the fsync of the target's folder (which makes the rename
        durable) to the caller, who can then do it once for many files (group commit).
        """
        dataset = read_header(staged, self.header_keywords)
        target = self.path_for(dataset)
        self._make_parent(target)
        sop_uid = str(dataset.get("SOPInstanceUID", ""))
        if target.exists():
            existing = read_header_or_none(target, ["SOPInstanceUID"])
            if existing is not None and str(existing.get("SOPInstanceUID", "")) != sop_uid:
                raise StorageError(
                    f"layout {self.layout.template!r} maps two instances to {target}: "
                    f"{existing.get('SOPInstanceUID')} and {sop_uid}; add {{SOPInstanceUID}}"
                )
        os.replace(staged, target)
        if sync_dir:
            fsync_dir(target.parent)
        meta = dataset.file_meta
        return StoredInstance(
            path=target,
            relative_path=target.relative_to(self.root),
            study_uid=str(dataset.get("StudyInstanceUID", "")),
            series_uid=str(dataset.get("SeriesInstanceUID", "")),
            sop_instance_uid=sop_uid,
            sop_class_uid=str(dataset.get("SOPClassUID", meta.get("MediaStorageSOPClassUID", ""))),
            transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
            size=size,
            sha256=sha256,
            modality=str(dataset.get("Modality", "")),
            patient_id=str(dataset.get("PatientID", "")),
            accession_number=str(dataset.get("AccessionNumber", "")),
            study_date=str(dataset.get("StudyDate", "")),
        )


class StagedFile:
    """A temp file being filled with one object's bytes, hashed as they arrive."""

    def __init__(self, storage: StorageDir) -> None:
        self._storage = storage
        fd, name = tempfile.mkstemp(dir=storage.tmp_dir, prefix="incoming-", suffix=".part")
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self._hash = hashlib.sha256()
        self._size = 0
        self.result: StoredInstance | None = None

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self._size += len(chunk)

    def commit(self, *, sync_dir: bool = True) -> None:
        """fsync, then rename into the layout (see `StorageDir.commit` for `sync_dir`)."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self.result = self._storage.commit(
                self.path, self._size, self._hash.hexdigest(), sync_dir=sync_dir
            )
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


def read_header(path: Path, keywords: list[str] | None = None) -> Dataset:
    """The header of a Part 10 file, without pixel data; StorageError if it is not one.

    With `keywords`, only those elements are decoded (and the file meta), which is what
    storing needs and several times cheaper than decoding every element.
    """
    try:
        return pydicom.dcmread(
            path, stop_before_pixels=True, defer_size="4 KB", specific_tags=keywords
        )
    except (InvalidDicomError, EOFError, ValueError, OSError) as exc:
        raise StorageError(f"received object is not valid DICOM Part 10: {exc}") from None


def read_header_or_none(path: Path, keywords: list[str] | None = None) -> Dataset | None:
    try:
        return read_header(path, keywords)
    except StorageError:
        return None


def fsync_dir(path: Path) -> None:
    """Make the entries of a folder (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
