"""What the runner, `verify` and the reports ask of a stored file: its digest, and whether it
is still there as the checkpoint recorded it.

One place, so that they never disagree on what "missing" or "changed" means; a symbolic link
or a folder where a file was recorded counts as missing (never followed).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Literal

#: Bytes read at a time: bounds memory; hashlib releases the GIL on buffers this large.
CHUNK = 1 << 20


def hash_file(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex digest) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file."""
    return hash_file(path)[1]


#: What makes a path "not there" rather than unreadable (the errors pathlib's `is_file` hides).
_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EBADF})


def recorded_size_problem(path: Path | str, size: int) -> Literal["missing", "changed"] | None:
    """None when a regular file of the recorded `size` is at `path` (content not read).

    One `lstat`, not following a link: a finished rerun asks this of every stored file.
    """
    try:
        found = os.lstat(path)
    except OSError as error:
        if error.errno in _ABSENT:
            return "missing"
        raise
    if not stat.S_ISREG(found.st_mode):  # a symbolic link, a folder, a device
        return "missing"
    return "changed" if found.st_size != size else None
