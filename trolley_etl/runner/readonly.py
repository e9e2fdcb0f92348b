"""Reading a storage root that may be read-only (issue 13).

`verify` (without `--repair`) takes the root lock so that no run writes while it hashes.
On a read-only root the lock file cannot be created, but nothing can write there either,
so verifying without the lock is safe; on a writable root the lock is taken as before.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

#: The errors that mean "this root cannot be written" (not "it is busy").
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


@contextlib.contextmanager
def reader_lock(root: Path) -> Iterator[None]:
    """The root lock when the root is writable; nothing when it is read-only."""
    from trolley_etl.runner.run import root_lock

    try:
        lock = root_lock(root)
        lock.__enter__()
    except OSError as exc:
        if exc.errno not in READ_ONLY_ERRNOS:
            raise
        yield
        return
    try:
        yield
    finally:
        lock.__exit__(None, None, None)
