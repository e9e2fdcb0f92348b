"""`verify`: re-read every stored file and compare it with what the checkpoint recorded.

The SHA-256 in the checkpoint was computed while the file streamed in, before it was renamed
into place, so a mismatch now means the copy on disk changed (bit rot, an editor, a copy
gone wrong). Files are re-hashed in 1 MiB chunks (memory stays flat whatever their size),
several at once: hashlib releases the GIL on large buffers.

Repair forgets the broken files, deletes the changed ones (never renamed over: a flipped
byte in the header could make the new file look like another instance), marks their items
pending, and lets the Runner download them again like any resumed run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trolley_etl.core.constants import STATE_DIR
from trolley_etl.core.files import hash_file, recorded_size_problem
from trolley_etl.runner.checkpoint import FAILED, PENDING, Checkpoint, FileRecord
from trolley_etl.runner.faults import crash_point
from trolley_etl.runner.report import ROOT_TAG_FILES

if TYPE_CHECKING:
    from trolley_etl.core.objectstore import ObjectStore

CHUNK = 1 << 20
MISSING, CHANGED, UNEXPECTED = "missing", "changed", "unexpected"


@dataclass(frozen=True)
class Problem:
    kind: str  # missing | changed | unexpected
    path: str  # relative to the root, POSIX separators
    sop_instance_uid: str = ""
    item_id: int | None = None
    expected_size: int | None = None
    actual_size: int | None = None
    expected_sha256: str = ""
    actual_sha256: str = ""

    def describe(self) -> str:
        if self.kind == CHANGED:
            if self.expected_size != self.actual_size:
                return (
                    f"changed {self.path}: size {self.actual_size}, recorded {self.expected_size}"
                )
            return (
                f"changed {self.path}: sha256 {self.actual_sha256}, recorded {self.expected_sha256}"
            )
        return f"{self.kind} {self.path}"


@dataclass
class VerifyResult:
    checked: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "bytes": self.bytes,
            "ok": self.ok,
            "counts": {kind: len(self.of_kind(kind)) for kind in (MISSING, CHANGED, UNEXPECTED)},
            "problems": [asdict(p) for p in self.problems],
        }


def _check(root: Path, record: FileRecord) -> Problem | None:
    path = root / record.path
    known: dict[str, Any] = {
        "path": record.path,
        "sop_instance_uid": record.sop_instance_uid,
        "item_id": record.item_id,
        "expected_size": record.size,
        "expected_sha256": record.sha256,
    }
    problem = recorded_size_problem(path, record.size)
    if problem == MISSING:
        return Problem(MISSING, **known)
    try:
        if problem == CHANGED:  # no need to read it
            return Problem(CHANGED, **known, actual_size=path.stat().st_size)
        size, sha = hash_file(path)
    except FileNotFoundError:
        return Problem(MISSING, **known)
    if sha != record.sha256 or size != record.size:
        return Problem(CHANGED, **known, actual_size=size, actual_sha256=sha)
    return None


def walk_payload(root: Path) -> Iterator[str]:
    """Every file under the root except trolley-etl's own: `.trolley/` and the tag files."""
    for folder, dirs, files in os.walk(root):  # symlinks to folders are not followed
        here = Path(folder)
        if here == root:
            dirs[:] = [d for d in dirs if d != STATE_DIR]
            files = [f for f in files if f not in ROOT_TAG_FILES]
        for name in files:
            yield (here / name).relative_to(root).as_posix()
        for name in dirs:  # a symlinked folder is listed (it is unexpected), not entered
            if (here / name).is_symlink():
                yield (here / name).relative_to(root).as_posix()


def _check_object(
    objects: ObjectStore, listed: dict[str, int], record: FileRecord
) -> Problem | None:
    """`_check` for an object-storage root (issue 19): the listing gives the size, a GET the
    bytes to hash."""
    from trolley_etl.core.errors import ObjectNotFoundError

    known: dict[str, Any] = {
        "path": record.path,
        "sop_instance_uid": record.sop_instance_uid,
        "item_id": record.item_id,
        "expected_size": record.size,
        "expected_sha256": record.sha256,
    }
    if record.path not in listed:
        return Problem(MISSING, **known)
    if listed[record.path] != record.size:
        return Problem(CHANGED, **known, actual_size=listed[record.path])
    try:
        size, sha = objects.hash_object(record.path)
    except ObjectNotFoundError:
        return Problem(MISSING, **known)
    if sha != record.sha256 or size != record.size:
        return Problem(CHANGED, **known, actual_size=size, actual_sha256=sha)
    return None


def verify_root(
    root: Path, checkpoint: Checkpoint, workers: int = 4, *, objects: ObjectStore | None = None
) -> VerifyResult:
    """Re-hash every recorded file; list missing, changed and unexpected ones.

    With `objects`, the files are the objects under that bucket prefix (issue 19); `root` is
    then the local state folder.
    """
    records = list(checkpoint.files())
    result = VerifyResult(checked=len(records), bytes=sum(r.size for r in records))
    listed = dict(objects.list_objects()) if objects is not None else {}

    def check(record: FileRecord) -> Problem | None:
        if objects is not None:
            return _check_object(objects, listed, record)
        return _check(root, record)

    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify") as pool:
        for problem in pool.map(check, records):
            if problem is not None:
                result.problems.append(problem)
    known = {r.path for r in records}
    payload = (
        (path for path in listed if path not in ROOT_TAG_FILES)
        if objects is not None
        else walk_payload(root)
    )
    result.problems.extend(
        Problem(UNEXPECTED, path) for path in sorted(payload) if path not in known
    )
    result.problems.extend(unfinished_items(checkpoint))  # issue 13
    return result


#: Item states that mean "not all on disk": they count as missing (issue 13).
UNFINISHED_STATES = (PENDING, FAILED, "incomplete")


def unfinished_items(checkpoint: Checkpoint) -> list[Problem]:
    """Items not done (a repair or run stopped half-way, a damaged file found by `run`):
    what they should hold is not on disk, whatever the recorded files say."""
    return [
        Problem(MISSING, f"{item.reference} ({item.state})", item_id=item.item_id)
        for item in checkpoint.items(UNFINISHED_STATES)
    ]


def prepare_repair(
    root: Path, checkpoint: Checkpoint, result: VerifyResult, *, objects: ObjectStore | None = None
) -> set[int]:
    """Forget missing and changed files, delete the changed ones, mark their items pending.

    Unexpected files are left alone: they may be someone's own, and nothing says what they
    should contain. Returns the item ids that will be downloaded again.
    """
    broken: dict[int, list[Problem]] = {}
    for problem in result.problems:
        if problem.kind in (MISSING, CHANGED) and problem.item_id is not None:
            broken.setdefault(problem.item_id, []).append(problem)
    for item_id, problems in broken.items():
        files = [p for p in problems if p.sop_instance_uid]
        reason = "; ".join(f"verify: {p.kind} {p.path}" for p in problems)[:1000]
        # one transaction per item (forget its files, mark it pending), then delete: a crash
        # anywhere leaves the item pending or untouched, never done with forgotten files
        checkpoint.reopen_item(item_id, [p.sop_instance_uid for p in files], reason)
        for problem in files:
            if problem.kind == CHANGED and objects is not None:  # issue 19: s3:// root
                objects.delete(problem.path)
            elif problem.kind == CHANGED:
                (root / problem.path).unlink(missing_ok=True)
        crash_point("repair-item")
    return set(broken)
