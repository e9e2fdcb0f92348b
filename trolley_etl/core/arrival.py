"""What arrives is checked against what was asked, before anything is stored.

A downloader streams each received object into a sink; `CheckedSink` sits in front of the
real one for one retrieval (a study, series or instance reference) and refuses:

- an object whose StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID (as far as the
  reference names them) is not the one asked for: an archive answering with another
  patient's study must not have it stored under ours;
- a second object with the same SOPInstanceUID and different bytes (which one is right?);
- an object larger than `max_object_bytes` (an endless part must not fill the disk).

A refused object is aborted (its temp file removed) and the error becomes the error of the
retrieval, so the unit is retried or marked failed, never done.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import re
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from trolley_etl.core.constants import UID_KEYWORDS
from trolley_etl.core.errors import (
    DiskFullError,
    InvalidUidError,
    ObjectTooLargeError,
    UnexpectedInstanceError,
)
from trolley_etl.core.uids import single_uid

if TYPE_CHECKING:
    from trolley_etl.core.backend import InstanceSink, InstanceWriter
    from trolley_etl.core.model import Reference

#: Bytes of each object kept to read its UIDs from (headers are rarely longer than 64 KiB;
#: the rest is room for large private elements before group 0020).
PREFIX_BYTES = 1 << 20
#: The UIDs are first looked for once this many bytes arrived; only when they are not all
#: there is more kept (up to PREFIX_BYTES): copying each object's first megabyte cost as
#: much CPU as hashing it.
FIRST_LOOK_BYTES = 64 << 10
#: Default largest object accepted (DICOM lengths are 32-bit; bigger is not a real object).
DEFAULT_MAX_OBJECT_BYTES = 4 << 30


def expected_uids(reference: Reference) -> dict[str, str]:
    """keyword -> UID that every object fetched for `reference` must carry."""
    expected = {"StudyInstanceUID": reference.study_uid}
    series = getattr(reference, "series_uid", None)
    if series:
        expected["SeriesInstanceUID"] = series
    instance = getattr(reference, "instance_uid", None)
    if instance:
        expected["SOPInstanceUID"] = instance
    return expected


class CheckedSink:
    """A sink for one retrieval that checks each object before handing it on (see module)."""

    def __init__(
        self,
        sink: InstanceSink,
        reference: Reference,
        *,
        max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
        root: Path | None = None,
    ) -> None:
        self.sink = sink
        self.root = root  # the storage root, named when its disk is full
        self.reference = reference
        self.expected = expected_uids(reference)
        self.max_object_bytes = max_object_bytes
        self._digests: dict[str, bytes] = {}  # SOPInstanceUID -> content digest, this retrieval

    def open_instance(self) -> CheckedWriter:
        try:
            return CheckedWriter(self, self.sink.open_instance())
        except OSError as exc:
            raise disk_full_error(exc, self.root) or exc from None

    def _admit(self, uids: dict[str, str], digest: bytes) -> None:
        """Raise UnexpectedInstanceError unless the object belongs to this retrieval."""
        for keyword, wanted in self.expected.items():
            if uids.get(keyword) != wanted:
                raise UnexpectedInstanceError(
                    f"asked for {self.reference} but the archive sent {keyword} "
                    f"{uids.get(keyword)!r}; nothing of it was stored"
                )
        sop = uids["SOPInstanceUID"]
        seen = self._digests.setdefault(sop, digest)
        if seen != digest:
            raise UnexpectedInstanceError(
                f"the archive sent SOPInstanceUID {sop} twice with different content for "
                f"{self.reference}; which one is right cannot be told"
            )


class CheckedWriter:
    """Forwards bytes to the real writer; checks size on the way and UIDs before commit."""

    def __init__(self, sink: CheckedSink, inner: InstanceWriter) -> None:
        self._sink = sink
        self._inner = inner
        self._size = 0
        self._prefix = bytearray()
        self._found: dict[str, object] | None = None  # the UIDs, once read from the prefix
        # a writer that reads the header itself (a StagedFile) is asked for the UIDs, so
        # that each header is read once; otherwise they are looked for once 64 KiB arrived
        self._inner_uids: Callable[[], dict[str, object] | None] | None = getattr(
            inner, "header_uids", None
        )
        self._keep = 0 if self._inner_uids is not None else FIRST_LOOK_BYTES
        # the inner writer's own hash when it has one (issue 17: a second hash of every
        # byte cost more CPU than parsing and writing them)
        self._digest: Callable[[], bytes] = getattr(inner, "content_digest", lambda: b"")
        self._hash = None if hasattr(inner, "content_digest") else hashlib.blake2b(digest_size=16)

    def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._sink.max_object_bytes:
            raise ObjectTooLargeError(
                f"an object for {self._sink.reference} is larger than the limit of "
                f"{self._sink.max_object_bytes} bytes (run.limits.max_object_mb)"
            )
        if self._found is None and len(self._prefix) < self._keep:
            self._prefix += chunk[: self._keep - len(self._prefix)]
            if len(self._prefix) >= self._keep:
                self._look()
        if self._hash is not None:
            self._hash.update(chunk)
        try:
            self._inner.write(chunk)
        except OSError as exc:
            raise disk_full_error(exc, self._sink.root) or exc from None

    @property
    def accepts_views(self) -> bool:
        """Views pass through to the writer behind, if it takes them."""
        return bool(getattr(self._inner, "accepts_views", False))

    def _look(self) -> None:
        """Read the UIDs from the bytes kept so far and stop keeping bytes; if they are not
        all there yet, keep up to PREFIX_BYTES (the last look is then at commit)."""
        found = _scan_uids(bytes(self._prefix))
        if found is None:
            self._keep = PREFIX_BYTES
        else:
            self._found, self._prefix = found, bytearray()

    def _uids(self) -> dict[str, str]:
        if self._found is None and self._inner_uids is not None:
            self._found = self._inner_uids()
            if self._found is None:  # not a header storing reads: look at its first bytes
                prefix = getattr(self._inner, "header_prefix", bytes)()
                return read_uids(prefix, complete=self._size <= len(prefix))
        if self._found is not None:
            return _checked_uids(self._found)
        return read_uids(bytes(self._prefix), complete=self._size <= len(self._prefix))

    def commit(self) -> None:
        try:
            uids = self._uids()
            digest = self._digest() if self._hash is None else self._hash.digest()
            self._sink._admit(uids, digest)
        except BaseException:
            self._inner.abort()
            raise
        try:
            self._inner.commit()
        except OSError as exc:
            raise disk_full_error(exc, self._sink.root) or exc from None

    def abort(self) -> None:
        self._inner.abort()


def read_uids(prefix: bytes, *, complete: bool) -> dict[str, str]:
    """The three UIDs from an object's first bytes; UnexpectedInstanceError if unreadable."""
    from trolley_etl.core.json_header import looks_like_json

    if looks_like_json(prefix):  # DICOM JSON of a metadata-only pull
        values = _uids_from_json(prefix, complete=complete)
    else:
        found = _scan_uids(prefix, complete=complete)
        values = _uids_with_pydicom(prefix) if found is None else found
    return _checked_uids(values)


def _scan_uids(prefix: bytes, *, complete: bool = False) -> dict[str, object] | None:
    """The three UIDs' values as the fast header reader finds them in a Part 10 prefix;
    None unless all three are there (DICOM JSON, truncated, or unusual: look again)."""
    from trolley_etl.core.header_scan import scan_header
    from trolley_etl.core.json_header import looks_like_json

    if looks_like_json(prefix):
        return None
    facts = scan_header(prefix, UID_KEYWORDS, complete=complete)
    if facts is None:
        return None
    values: dict[str, object] = {k: facts.get(k) for k in UID_KEYWORDS}
    return None if any(v is None for v in values.values()) else values


def _checked_uids(values: dict[str, object]) -> dict[str, str]:
    try:
        return {k: single_uid(values.get(k), k) for k in UID_KEYWORDS}
    except InvalidUidError as exc:
        raise UnexpectedInstanceError(f"received object: {exc}; nothing of it was stored") from None


#: `"0020000D": {"vr": "UI", "Value": ["1.2.3"]}` in DICOM JSON (tags of the three UIDs).
_JSON_UID = re.compile(
    rb'"(0020000D|0020000E|00080018)"\s*:\s*\{[^{}]*?"Value"\s*:\s*\[\s*"([^"]*)"'
)
_JSON_TAGS = {
    b"0020000D": "StudyInstanceUID",
    b"0020000E": "SeriesInstanceUID",
    b"00080018": "SOPInstanceUID",
}


def _uids_from_json(prefix: bytes, *, complete: bool) -> dict[str, object]:
    """The three UIDs of one DICOM JSON object: parsed when it is whole in `prefix`, else
    found in its first bytes (tags are written in ascending order, UIDs come early)."""
    if complete:
        try:
            item = json.loads(prefix)
        except ValueError:
            return {}
        if not isinstance(item, dict):
            return {}
        values: dict[str, object] = {}
        for tag, keyword in _JSON_TAGS.items():
            element = item.get(tag.decode())
            found = element.get("Value") if isinstance(element, dict) else None
            values[keyword] = found[0] if isinstance(found, list) and len(found) == 1 else found
        return values
    return {
        _JSON_TAGS[m.group(1)]: m.group(2).decode("ascii", "replace")
        for m in _JSON_UID.finditer(prefix)
    }


def _uids_with_pydicom(prefix: bytes) -> dict[str, object]:
    import pydicom

    try:
        dataset = pydicom.dcmread(
            io.BytesIO(prefix), stop_before_pixels=True, specific_tags=list(UID_KEYWORDS)
        )
    except Exception:  # truncated prefix, not DICOM at all: the check below names it
        return {}
    return {k: dataset.get(k) for k in UID_KEYWORDS}


def disk_full_error(error: BaseException, root: Path | None) -> DiskFullError | None:
    """A DiskFullError naming the root and its free space, if `error` means the disk is
    full (ENOSPC, EDQUOT, or SQLite's "database or disk is full"); None otherwise."""
    if isinstance(error, DiskFullError):
        return error
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or (isinstance(error, sqlite3.OperationalError) and "disk is full" in str(error))
    if not full:
        return None
    where = root or Path(getattr(error, "filename", None) or ".")
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    return DiskFullError(
        f"no space left on the disk holding {where} ({free}); free some space and run "
        "again: everything stored so far is kept"
    )
