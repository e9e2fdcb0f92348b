"""DICOM UIDs as they arrive from archives and manifests: checked before they are used.

A UID ends up in URLs (`studies/{uid}`), C-GET identifiers and file names. An archive that
answers a search with an empty UID, two values, `../../etc` or a NUL byte must not make us
fetch the archive's root, step outside its base path or write a literal list as a name, so
every UID is checked here first. Rows of a search answer with a bad UID are set aside and
reported (`rejected_rows`), never fetched.

The syntax is PS3.5 9.1 (components of digits without leading zeros, separated by dots, at
most 64 characters), the same rule manifest filters follow. This module imports nothing heavy
(no pydicom).
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from trolley_etl.core.errors import InvalidUidError

MAX_UID_LENGTH = 64
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
#: Rejected rows kept for reporting, at most (the count goes on beyond it).
MAX_REJECTED_KEPT = 1000


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and bool(_UID.match(value))


def check_uid(value: object, what: str = "UID") -> str:
    """The UID itself, or InvalidUidError naming `what` and the (shortened) bad value."""
    if is_valid_uid(value):
        return str(value)
    raise InvalidUidError(f"{what} {_shown(value)} is not a valid DICOM UID")


def single_uid(value: Any, what: str) -> str:
    """One UID from a header or search value (text, a one-item list, a pydicom MultiValue)."""
    if value is None or value == "":
        raise InvalidUidError(f"{what} is missing or empty")
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
        if len(items) != 1:
            raise InvalidUidError(f"{what} has {len(items)} values, not one")
        value = items[0]
        if value is None or value == "":
            raise InvalidUidError(f"{what} is missing or empty")
    if not isinstance(value, str):
        raise InvalidUidError(f"{what} {_shown(value)} is not text")
    return check_uid(str(value), what)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class RejectedRows:
    """Search rows set aside for a bad UID, collected from any thread until drained."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: deque[dict[str, str]] = deque(maxlen=MAX_REJECTED_KEPT)
        self.count = 0

    def add(self, level: str, reason: str, row: dict[str, str]) -> None:
        with self._lock:
            self.count += 1
            self._kept.append({"level": level, "reason": reason, **row})

    def drain(self) -> list[dict[str, str]]:
        """The rows rejected since the last drain (at most MAX_REJECTED_KEPT of them)."""
        with self._lock:
            rows = list(self._kept)
            self._kept.clear()
            return rows


#: Every searcher's rejected rows; the runner drains it after its search and expand steps.
rejected_rows = RejectedRows()
