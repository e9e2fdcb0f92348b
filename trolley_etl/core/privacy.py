"""Private by default: what holds patient identifiers is readable by its owner only.

The DICOM files, the checkpoint (its search cache holds PatientName, PatientID and
AccessionNumber), the logs, the reports and the lock files all name patients. Whatever the
user's umask, trolley-etl creates them owner-only: the command line sets the umask to 077
(folders 0700, files 0600), and `prepare_root` tightens a root made by an older version.

`storage.permissions: group` is for a team that shares an extraction through a Unix group:
the DICOM files and their folders become group-readable (0640 and 0750); the `.trolley`
state folder (checkpoint, logs, reports) stays owner-only.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from trolley_etl.core.constants import STATE_DIR

PRIVATE_UMASK = 0o077
#: Mode of each stored DICOM file under `storage.permissions: group`.
GROUP_FILE_MODE = 0o640


def private_umask() -> int:
    """Make every file and folder this process creates owner-only; returns the old umask."""
    return os.umask(PRIVATE_UMASK)


def prepare_root(storage: Any, permissions: str = "private") -> None:
    """Set the umask for `permissions` and make `.trolley` and everything in it owner-only.

    `storage` is the run's StorageDir: under `group` its files are made group-readable.
    """
    os.umask(PRIVATE_UMASK)  # group-readable data is chmod-ed explicitly (StorageDir)
    if permissions == "group":
        storage.file_mode = GROUP_FILE_MODE
        with contextlib.suppress(OSError):  # the group must be able to enter the root
            mode = stat.S_IMODE(Path(storage.root).stat().st_mode)
            if mode & 0o050 != 0o050:
                Path(storage.root).chmod(mode | 0o050)
    state = Path(storage.root) / STATE_DIR
    if not state.is_dir():
        return
    _chmod(state, 0o700)
    for folder, dirs, files in os.walk(state):
        for name in dirs:
            _chmod(Path(folder) / name, 0o700)
        for name in files:
            _chmod(Path(folder) / name, 0o600)


def _chmod(path: Path, mode: int) -> None:
    with contextlib.suppress(OSError):  # a read-only root: the run fails later, clearly
        if stat.S_IMODE(path.lstat().st_mode) != mode and not path.is_symlink():
            path.chmod(mode)
