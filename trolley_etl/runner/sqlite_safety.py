"""Opening the checkpoint safely: read-only where the root is, and never over a damaged one.

`status`, `report` and `verify` only read, so they must work on a storage root that is
read-only (an archived extraction, a mounted snapshot). A WAL database cannot simply be
opened read-only there: SQLite wants to create its `-shm` file. So the read-only connection
tries `mode=ro` first and falls back to `immutable=1`, which reads the file as it is (correct
when nobody writes it, which a read-only root guarantees).

A damaged checkpoint (not a database, a torn file) is named with what to do, and never
touched: it is the record of what was pulled.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import quote

from trolley_etl.core.errors import CheckpointDamagedError, TrolleyError


def damaged_checkpoint_error(path: Path, error: sqlite3.DatabaseError) -> TrolleyError:
    text = str(error)
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return TrolleyError(
            f"cannot write the checkpoint {path}: the storage root is read-only (status, "
            "report and verify work on a read-only root; run needs to write)"
        )
    return CheckpointDamagedError(
        f"the checkpoint {path} cannot be read ({text}); it was not changed. Restore it from "
        f"a backup, or move {path.parent} aside and run again to start afresh"
    )


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that never writes: `mode=ro`, else `immutable=1` (see module)."""
    if not path.is_file():
        raise TrolleyError(f"no checkpoint at {path}: nothing has run yet")
    last: sqlite3.DatabaseError | None = None
    for flags in ("mode=ro", "mode=ro&immutable=1"):
        uri = f"file:{quote(str(path.absolute()))}?{flags}"
        try:
            db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA busy_timeout=10000")
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.DatabaseError as exc:
            last = exc
            if "not a database" in str(exc) or "malformed" in str(exc):
                break
    assert last is not None
    raise damaged_checkpoint_error(path, last)
