"""Atomic text files: a crash leaves either the old file or the new one, never half of one.

Lock files, reports and the BagIt manifests are audit records; a reader (git, sha256sum, a
data-protection officer) must never see a truncated one.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temp file in the same folder, fsync, rename over `path`, fsync the folder.

    The file is created private (0600, like the DICOM files): reports name patients.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


#: What `write_atomic` names its temp files: `.NAME.` + mkstemp's 8 random characters + `.tmp`.
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temp_files(*folders: Path) -> int:
    """Remove temp files a killed `write_atomic` left in `folders` (issue 13); call it only
    while holding the root lock, so no live write loses its file. Returns how many."""
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if _TEMP_NAME.match(path.name) and path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed += 1
    return removed
