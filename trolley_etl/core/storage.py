"""Saving received DICOM objects to disk, atomically, in a UID-based folder layout.

Bytes are written exactly as the archive sent them (no decoding, no transcoding) to a temporary
file under `ROOT/.trolley/tmp/` (same file system as the data, so the final rename is atomic),
hashed on the way, fsynced, then renamed into the path the layout template (`core.layout`)
gives (a run instead renames at once and syncs by batch: `runner.committer`). The header
values that name the file are read from the first bytes kept in memory while it streamed
(`header_scan`), falling back to pydicom on the file for anything unusual. Values from DICOM
headers are sanitised before they become path components, so that no archive, however
hostile, can make us write outside the root.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from trolley_etl.core.constants import JSON_LAYOUT, STATE_DIR, UID_KEYWORDS
from trolley_etl.core.errors import StorageError
from trolley_etl.core.header_scan import HeaderFacts, facts_from_dataset, scan_header
from trolley_etl.core.json_header import json_header_facts, looks_like_json
from trolley_etl.core.layout import (  # noqa: F401 - part of this module's interface
    DEFAULT_LAYOUT,
    MAX_COMPONENT_LENGTH,
    MISSING_VALUE,
    HeaderValues,
    LayoutTemplate,
    sanitise_component,
)

if TYPE_CHECKING:
    from trolley_etl.deid.engine import Deidentifier

#: Header attributes every stored file is described by (paths, checkpoint, audit report).
HEADER_KEYWORDS = frozenset(
    {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "Modality",
        "PatientID",
        "AccessionNumber",
        "StudyDate",
    }
)
#: How many first bytes of each object are kept in memory to read its header from.
HEADER_PREFIX_BYTES = 64 * 1024


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
    #: The SOP Instance UID inside the file, when it differs from the source's (de-identified).
    file_sop_instance_uid: str = ""


class StorageDir:
    """Stores DICOM objects under `root` in `layout`. Safe to share between threads.

    `file_format="json"` stores DICOM JSON files (metadata-only pulls) instead of Part 10;
    the default layout then ends in `.json`.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        layout: str = DEFAULT_LAYOUT,
        deid: Deidentifier | None = None,
        *,
        file_format: str = "dicom",
    ) -> None:
        if file_format not in ("dicom", "json"):
            raise StorageError(f"unknown file format {file_format!r} (dicom or json)")
        self.file_format = file_format
        if file_format == "json" and layout == DEFAULT_LAYOUT:
            layout = JSON_LAYOUT
        self.root = Path(root).absolute()
        #: De-identifies each file before `StagedFile.commit` puts it in place (Python API).
        self.deid = deid
        self.layout = LayoutTemplate(layout)
        self.tmp_dir = self.root / STATE_DIR / "tmp"
        #: What commit reads from each header: the layout's keywords and the audit facts.
        self.header_keywords = sorted({*HEADER_KEYWORDS, *self.layout.keywords})
        self._ready_folders: set[Path] = set()  # created and checked in this process
        #: Mode of each stored file; None keeps mkstemp's owner-only 0600 (core.privacy).
        self.file_mode: int | None = None

    #: True where `install` sends files away (object storage) instead of renaming them.
    is_remote = False

    def open_instance(self) -> StagedFile:
        """A writer for one object; nothing appears in the layout until it is committed."""
        if self.tmp_dir not in self._ready_folders:
            self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._ready_folders.add(self.tmp_dir)
        return StagedFile(self)

    def _mkdir(self, path: Path, *, parents: bool = False) -> None:
        """A folder with `folder_mode` exactly (mkdir alone would apply the umask)."""
        try:
            path.mkdir(mode=self.folder_mode, parents=parents)
        except FileExistsError:
            return
        if self.folder_mode != 0o700:
            path.chmod(self.folder_mode)

    @property
    def folder_mode(self) -> int:
        """Owner-only folders, or group-readable ones with group-readable files."""
        return 0o750 if self.file_mode is not None and self.file_mode & 0o040 else 0o700

    def path_for(self, dataset: HeaderValues) -> Path:
        """Absolute path for a dataset, proven to stay under the root."""
        return self._place(dataset)[1]

    def _place(self, dataset: HeaderValues) -> tuple[Path, Path]:
        """(path relative to the root, absolute path) for a dataset, proven to stay under
        the root: relative, and no component `..` (the layout's sanitised components never
        are; this holds even if that changed)."""
        relative = self.layout.render(dataset)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            raise StorageError(f"refusing to write outside {self.root}: {relative}")
        return relative, self.root / relative

    def _make_parent(self, target: Path) -> bool:
        """Create the folders of `target` one by one, refusing symlinks planted in the tree;
        return whether something other than a symlink is at `target` already.

        Folders already created and checked by this process are not checked again: a study's
        hundreds of instances share one folder.
        """
        if target.parent not in self._ready_folders:
            current = self.root
            self._mkdir(current, parents=True)
            for name in target.relative_to(self.root).parts[:-1]:
                current = current / name
                if current.is_symlink():
                    raise StorageError(f"refusing to follow a symlink inside the output: {current}")
                self._mkdir(current)
            self._ready_folders.add(target.parent)
        try:
            mode = os.lstat(target).st_mode
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(mode):
            raise StorageError(f"refusing to replace a symlink inside the output: {target}")
        return True

    def header_facts(
        self, staged: Path, size: int, header_prefix: bytes | None = None
    ) -> HeaderFacts:
        """The header values storing needs (`header_keywords`) of a complete temp file;
        StorageError if it is not the kind of object this storage keeps.

        `header_prefix` is the file's first bytes, if the caller kept them (saves reading the
        header back from disk).
        """
        if self.file_format == "json":
            return json_header_facts(staged, self.header_keywords, header_prefix, size)
        if looks_like_json(header_prefix):
            raise StorageError(
                "received DICOM JSON where Part 10 was expected (a metadata-only download "
                "with format json needs storage made with file_format='json')"
            )
        return read_header_facts(staged, self.header_keywords, header_prefix, size)

    def describe(
        self,
        staged: Path,
        size: int,
        sha256: str,
        header_prefix: bytes | None = None,
        *,
        header: HeaderFacts | None = None,
    ) -> StoredInstance:
        """What a complete temp file is and where it belongs; StorageError if not Part 10.

        `header` is what `header_facts` gave for it, if the caller asked already; else it is
        read here (from `header_prefix` where it can). Nothing on disk changes.
        """
        if header is None:
            header = self.header_facts(staged, size, header_prefix)
        relative, target = self._place(header)
        return StoredInstance(
            path=target,
            relative_path=relative,
            study_uid=header.text("StudyInstanceUID"),
            series_uid=header.text("SeriesInstanceUID"),
            sop_instance_uid=header.text("SOPInstanceUID"),
            sop_class_uid=header.text("SOPClassUID")
            if header.get("SOPClassUID") is not None
            else header.media_storage_sop_class,
            transfer_syntax=header.transfer_syntax,
            size=size,
            sha256=sha256,
            modality=header.text("Modality"),
            patient_id=header.text("PatientID"),
            accession_number=header.text("AccessionNumber"),
            study_date=header.text("StudyDate"),
        )

    def install(self, staged: Path, stored: StoredInstance, *, sync_dir: bool = True) -> None:
        """Rename a complete, fsynced temp file to `stored.path`.

        `sync_dir=False` leaves the fsync of the target's folder (which makes the rename
        durable) to the caller, who can then do it once for many files (group commit).
        """
        target = stored.path
        if self._make_parent(target):
            existing: HeaderFacts | Dataset | None
            if self.file_format == "json":
                try:
                    existing = json_header_facts(target, ["SOPInstanceUID"])
                except (StorageError, OSError):
                    existing = None
            else:
                existing = read_header_or_none(target, ["SOPInstanceUID"])
            in_file = stored.file_sop_instance_uid or stored.sop_instance_uid
            if existing is not None and str(existing.get("SOPInstanceUID", "")) != in_file:
                raise StorageError(
                    f"layout {self.layout.template!r} maps two instances to {target}: "
                    f"{existing.get('SOPInstanceUID')} and {stored.sop_instance_uid}; "
                    "add {SOPInstanceUID}"
                )
        os.replace(staged, target)
        if sync_dir:
            fsync_dir(target.parent)


#: Temp names unique within this process; the process id makes them unique on the machine.
_temp_numbers = itertools.count()
_temp_prefix = f"incoming-{os.getpid()}"


def _new_temp_prefix() -> None:
    global _temp_prefix
    _temp_prefix = f"incoming-{os.getpid()}"


os.register_at_fork(after_in_child=_new_temp_prefix)  # a forked worker has its own id


def _create_temp(folder: Path) -> tuple[int, Path]:
    """A new owner-only temp file, created exclusively (no umask can widen 0600).

    A counter instead of `mkstemp`'s random names and retries: one system call per file.
    """
    while True:
        path = folder / f"{_temp_prefix}-{next(_temp_numbers)}.part"
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), path
        except FileExistsError:  # left by an earlier process with the same id: next number
            continue


class StagedFile:
    """A temp file being filled with one object's bytes, hashed as they arrive.

    Written through its file descriptor, unbuffered: the chunks are large already, and a
    Python file object would cost three more system calls per file to open it.
    """

    def __init__(self, storage: StorageDir) -> None:
        self._storage = storage
        self._fd, self.path = _create_temp(storage.tmp_dir)
        self._closed = False
        if storage.file_mode is not None:
            os.fchmod(self._fd, storage.file_mode)
        self._hash = hashlib.sha256()
        self._size = 0
        self._prefix = bytearray()  # the first bytes, to read the header from
        self._header: HeaderFacts | None = None  # read once, for the arrival check and here
        self.result: StoredInstance | None = None

    #: `write` takes memoryviews too (see core.backend.InstanceWriter).
    accepts_views = True

    def write(self, chunk: bytes) -> None:
        _write_all(self._fd, chunk)
        self._hash.update(chunk)
        self._size += len(chunk)
        if len(self._prefix) < HEADER_PREFIX_BYTES:
            self._prefix += chunk[: HEADER_PREFIX_BYTES - len(self._prefix)]

    def content_digest(self) -> bytes:
        """The SHA-256 of the bytes written so far (`arrival.CheckedWriter` reuses it)."""
        return self._hash.digest()

    def header_uids(self) -> dict[str, object] | None:
        """The complete object's three UIDs as storing reads its header, which `finish` then
        reuses (`arrival.CheckedWriter` asks, so each header is read once); None when it is
        not an object this storage can read."""
        try:
            if self._header is None:
                self._header = self._storage.header_facts(
                    self.path, self._size, bytes(self._prefix)
                )
        except StorageError:
            return None
        return {keyword: self._header.get(keyword) for keyword in UID_KEYWORDS}

    def header_prefix(self) -> bytes:
        """The object's first bytes (up to HEADER_PREFIX_BYTES)."""
        return bytes(self._prefix)

    def finish(self, *, sync: bool = True) -> StoredInstance:
        """Close the complete file and say what it is and where it belongs.

        With `sync=False` the file is not fsynced here (a large one has its write-back to disk
        started), and whoever installs it must make it durable (see `fsync_file`, or the
        committer's batch sync). On any error the temp file is removed.
        """
        try:
            if sync:
                os.fsync(self._fd)
            elif self._size >= EARLY_WRITEBACK_BYTES:
                start_writeback(self._fd)
            self._close()
            return self._storage.describe(
                self.path,
                self._size,
                self._hash.hexdigest(),
                bytes(self._prefix),
                header=self._header,
            )
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        """fsync, then rename into the layout and fsync the folder: one file, durable now.

        With a Deidentifier on the storage, the de-identified file is installed instead
        (`result` stays None when the burned-in gate held the instance back).
        """
        stored = self.finish(sync=True)
        if self._storage.deid is not None:
            placed = self._storage.deid.process(self.path, stored, self._storage)
            if placed is None:
                return
            self.path, stored = placed
            fsync_file(self.path)
        try:
            self._storage.install(self.path, stored)
        except BaseException:
            self.abort()
            raise
        self.result = stored

    def abort(self) -> None:
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    """All of `data` to `fd` (a write to a regular file is whole unless something failed,
    but a short write must never go unnoticed)."""
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]


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


def read_header_facts(
    path: Path, keywords: Iterable[str], prefix: bytes | None = None, size: int = -1
) -> HeaderFacts:
    """The `keywords` of a Part 10 file: from `prefix` (its first bytes, `size` the file's
    size) when the fast reader can, else from pydicom reading the file."""
    keywords = list(keywords)
    if prefix:
        facts = scan_header(prefix, keywords, complete=len(prefix) >= size >= 0)
        if facts is not None:
            return facts
    return facts_from_dataset(read_header(path, keywords), keywords)


def read_header_or_none(path: Path, keywords: list[str] | None = None) -> Dataset | None:
    try:
        return read_header(path, keywords)
    except StorageError:
        return None


#: Files at least this large have their write-back started as they are closed; smaller ones
#: are left to the kernel and the batch sync (20,000 files of 16 KB: 3.0 to 3.6 s of system
#: CPU without, 4.6 to 7.5 s with one write-back request each).
EARLY_WRITEBACK_BYTES = 256 * 1024


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing a file's dirty pages now, without waiting for them,
    so that a later fsync finds them (mostly) on disk already."""
    if hasattr(os, "posix_fadvise"):  # POSIX_FADV_DONTNEED starts writeback on Linux
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def fsync_path(path: Path) -> None:
    """Make a closed file's contents, or a folder's entries (a rename into it), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_file = fsync_dir = fsync_path  # the names say which of the two a caller means


def sync_filesystem(path: Path) -> None:
    """Make everything written to the file system holding `path` durable: file contents,
    renames and folders alike, in one call (Linux `syncfs`), instead of one fsync per file.

    Where `syncfs` is missing, every file system is synced (`sync`), which is slower but as
    safe. Raises OSError if the kernel reports a write-back error.
    """
    syncfs = _syncfs()
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs failed: {os.strerror(error)}", str(path))
    finally:
        os.close(fd)


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    try:
        function: Callable[[int], int] = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None
    return function
