"""The data steward's table of original -> pseudonym, kept outside the export.

A CSV (`kind,original,pseudonym`), created owner-only (0600) whatever the umask, appended to
as new values appear and flushed row by row, so a crash loses at most the row being written
(and the pseudonyms can always be computed again from the secret).
"""

from __future__ import annotations

import csv
import io
import os
import threading
from pathlib import Path

HEADER = ("kind", "original", "pseudonym")


class PseudonymMap:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8", newline="")
        self._seen = self._existing()
        if not self._seen and path.stat().st_size == 0:
            self._write(HEADER)

    def _existing(self) -> set[tuple[str, str]]:
        seen: set[tuple[str, str]] = set()
        with self.path.open(encoding="utf-8", newline="") as handle:
            for row in csv.reader(handle):
                if len(row) == 3 and tuple(row) != HEADER:
                    seen.add((row[0], row[1]))
        return seen

    def _write(self, row: tuple[str, str, str]) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(row)
        self._file.write(buffer.getvalue())
        self._file.flush()

    def add(self, kind: str, original: str, pseudonym: str) -> None:
        with self._lock:
            if (kind, original) in self._seen:
                return
            self._seen.add((kind, original))
            self._write((kind, original, pseudonym))

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                os.fsync(self._file.fileno())
                self._file.close()
