"""Moving stored files to their paths under a new `storage.layout` (`run --refresh`).

A layout change must never leave files where the old layout put them while the checkpoint,
the report and `verify` speak of the new one. The move is planned first: every recorded
file's new path is computed from its own header and written to the checkpoint in one
transaction (`files.new_path`), refusing before anything moves when two files would land on
one path. Then each file is renamed (atomic within the root's file system) and its record
updated. A kill at any point leaves rows with a planned `new_path`; the next `run --refresh`
finishes them: a file still at its old path is renamed, one already at its new path is only
recorded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from trolley_etl.core.constants import STATE_DIR
from trolley_etl.core.errors import LayoutConflictError, StorageError
from trolley_etl.core.storage import StorageDir, fsync_dir, read_header_facts
from trolley_etl.runner.checkpoint import Checkpoint
from trolley_etl.runner.faults import crash_point

#: Records updated per checkpoint transaction while moving.
BATCH = 200


def needs_relayout(checkpoint: Checkpoint, storage: StorageDir, layout: str) -> bool:
    """True when stored files were laid out differently, or a move was left unfinished."""
    if checkpoint.planned_moves():
        return True
    recorded = checkpoint.get_meta("layout")
    if recorded is not None:
        return recorded != layout and checkpoint.file_paths() != {}
    paths = checkpoint.file_paths()  # older checkpoints: compare one file with the layout
    if not paths:
        return False
    path = next(iter(paths.values()))
    try:
        return _new_path(storage, storage.root / path) != path
    except StorageError:  # unreadable or gone: `verify` reports it; no layout to learn here
        return False


def relayout(
    checkpoint: Checkpoint, storage: StorageDir, on_move: Callable[[str, str], None]
) -> int:
    """Move every stored file to its path under `storage`'s layout; return how many moved."""
    if not checkpoint.planned_moves():
        plan: dict[str, str] = {}
        owners: dict[str, str] = {}
        for sop, path in checkpoint.file_paths().items():
            try:
                new = _new_path(storage, storage.root / path)
            except StorageError:  # gone or damaged: stays where it is, `verify` reports it
                continue
            if new in owners:
                raise LayoutConflictError(
                    f"layout {storage.layout.template!r} maps {owners[new]} and {sop} to "
                    f"{new}; add {{SOPInstanceUID}} to it (nothing was moved)"
                )
            owners[new] = sop
            if new != path:
                plan[sop] = new
        checkpoint.plan_moves(plan)
        crash_point("after-move-plan")
    moved = 0
    done: list[tuple[str, str]] = []
    folders: set[Path] = set()
    for sop, old, new in checkpoint.planned_moves():
        source, target = storage.root / old, storage.root / new
        if source.exists():  # else moved before a kill (or gone: verify reports it missing)
            storage._make_parent(target)
            os.replace(source, target)
            folders.add(target.parent)
            crash_point("after-move")
        moved += 1
        on_move(old, new)
        done.append((sop, new))
        if len(done) >= BATCH:
            _record(checkpoint, done, folders)
    _record(checkpoint, done, folders)
    _remove_empty_folders(storage.root)
    return moved


def _record(checkpoint: Checkpoint, done: list[tuple[str, str]], folders: set[Path]) -> None:
    for folder in folders:  # the renames are durable before the checkpoint says so
        fsync_dir(folder)
    checkpoint.finish_moves(done)
    done.clear()
    folders.clear()


def _new_path(storage: StorageDir, path: Path) -> str:
    header = read_header_facts(path, storage.header_keywords)
    return storage.path_for(header).relative_to(storage.root).as_posix()


def _remove_empty_folders(root: Path) -> None:
    """Folders the old layout left empty; never `.trolley`, never the root itself."""
    for folder, _, _ in os.walk(root, topdown=False):
        here = Path(folder)
        if here == root or STATE_DIR in here.relative_to(root).parts:
            continue
        if not any(here.iterdir()):
            with contextlib.suppress(OSError):
                here.rmdir()
