"""Ordinary failures as one line and a documented exit code, never a traceback (issue 13).

A full disk, a read-only or misplaced storage root, a damaged checkpoint, a closed pipe:
these happen to every user and deserve a sentence saying what happened and what to do.
Only a real bug shows its traceback, and only when TROLLEY_ETL_DEBUG is set.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import sys
import warnings
from pathlib import Path

from trolley_etl.cli import exit_codes

#: Exit code when the reader of stdout went away (`verify | head`): what a Unix tool killed
#: by SIGPIPE returns (128 + 13), so `set -o pipefail` scripts treat it like `git log | head`.
BROKEN_PIPE = 141
DEBUG_VARIABLE = "TROLLEY_ETL_DEBUG"


def quiet_libraries() -> None:
    """No library warnings or log lines on the console: stderr carries only our own lines
    (and only JSON under `--log-format json`). pydicom warns about every odd value it reads,
    python-multipart and pynetdicom log through `logging`; none of that is for users."""
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    warnings.filterwarnings("ignore", module=r"pynetdicom(\.|$)")
    warnings.filterwarnings("ignore", module=r"python_multipart(\.|$)")
    warnings.filterwarnings("ignore", message=r"Pydantic serializer warnings")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydantic(\.|$)")
    logging.captureWarnings(True)
    root = logging.getLogger()
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())  # never Python's last-resort stderr handler
    for name in ("pydicom", "pynetdicom", "python_multipart", "multipart", "py.warnings"):
        library = logging.getLogger(name)
        library.propagate = False
        library.handlers = [logging.NullHandler()]


def free_space(path: Path) -> str:
    """Free space on the file system holding `path` (or its nearest existing parent)."""
    for candidate in (path, *path.parents):
        try:
            free = shutil.disk_usage(candidate).free
        except OSError:
            continue
        return _size(free)
    return "unknown"


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover


def describe(error: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for an ordinary failure; None for anything else (a bug)."""
    if isinstance(error, sqlite3.DatabaseError):
        return _describe_database(error)
    if isinstance(error, OSError) and error.errno is not None:
        where = error.filename or ""
        shown = f" {where}" if where else ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            place = Path(str(where)) if where else Path.cwd()
            return (
                f"no space left on the disk holding{shown} ({free_space(place)} free); "
                "free some space and run again: everything stored so far is kept",
                exit_codes.ITEMS_FAILED,
            )
        if error.errno == errno.EROFS:
            return f"cannot write{shown}: the file system is read-only", exit_codes.USAGE
        if error.errno in (errno.EACCES, errno.EPERM):
            return f"permission denied:{shown}", exit_codes.USAGE
        if error.errno in (errno.ENOTDIR, errno.EEXIST):
            return (
                f"{where or 'a path'} is in the way: a file stands where a folder is needed "
                "(is the storage root a file?)",
                exit_codes.USAGE,
            )
        if error.errno == errno.ENOENT:
            return f"no such file or folder:{shown}", exit_codes.USAGE
        if error.errno == errno.EISDIR:
            return f"{where} is a folder, not a file", exit_codes.USAGE
        reason = error.strerror or str(error)
        return f"{reason}{':' + shown if shown else ''}", exit_codes.USAGE
    return None


def _describe_database(error: sqlite3.DatabaseError) -> tuple[str, int]:
    """A checkpoint SQLite cannot write (read-only, full) or cannot read (damaged)."""
    text = str(error)
    if "readonly" in text or "read-only" in text:
        return (
            "cannot write to the checkpoint: the storage root is read-only "
            "(status, report and verify work on a read-only root; run needs to write)",
            exit_codes.USAGE,
        )
    if "disk is full" in text or "disk I/O error" in text:
        return f"cannot write to the checkpoint: {text}", exit_codes.ITEMS_FAILED
    return (
        f"the checkpoint database cannot be read ({text}); it was not changed: restore it "
        "from a backup, or move the .trolley folder aside to start again",
        exit_codes.USAGE,
    )


def silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush
    does not complain a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def debugging() -> bool:
    return bool(os.environ.get(DEBUG_VARIABLE))
