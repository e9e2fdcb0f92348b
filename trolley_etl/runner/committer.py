"""Making received files visible at once and durable in batches, off the download threads.

Download workers write each temp file, start its write-back to disk, close it and rename it
into the layout themselves, without waiting for the disk. One committer thread records what
has queued up in the checkpoint, one transaction per batch, each file with its SHA-256 as
written and listed as *unsynced*. A second thread makes the recorded files durable together:
one `syncfs` of the output's file system every `SYNC_FILES` files, `SYNC_BYTES` bytes or
`SYNC_SECONDS` seconds, then clears the unsynced list up to that point. The last sync happens
in `close`, before the run can report success: exit 0 still means everything is on stable
storage, but the disk is asked once per batch instead of once per file (an fsync per file
cost more than writing the bytes).

A crash or power cut loses at most what was not synced: `recover_unsynced`, at the start of
the next run, re-hashes the files still listed as unsynced, forgets those that do not match
and reopens their items, so that they are fetched again. A crash anywhere else leaves temp
files (removed by the next run) or renamed files the checkpoint does not know yet (fetched
again), never a claim of a file that is not, or may not stay, in place.

An item is marked done only after all its files are recorded (`ItemFiles.wait`). The queue
is bounded, so a checkpoint slower than the network slows the download down instead of
filling memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import queue
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trolley_etl.core.storage import StorageDir, StoredInstance, fsync_path, sync_filesystem
from trolley_etl.runner.checkpoint import Checkpoint
from trolley_etl.runner.faults import crash_point
from trolley_etl.runner.progress import Progress

#: Files waiting for the committer, at most; bounds memory and what a crash loses.
MAX_QUEUED = 512
#: Files per batch, at most (one checkpoint transaction).
MAX_BATCH = 512
#: How long the committer waits for more files before it records what it has, unless an
#: item is waiting for its files: a commit costs more than recording a file, and small
#: files came one per transaction (1,718 transactions for 2,000 files of 16 KB).
LINGER_SECONDS = 0.02
#: A sync is due after this many recorded files, bytes or seconds, whichever comes first:
#: bounds what a power cut can take back, and what the next run must re-hash.
SYNC_FILES = 4096
SYNC_BYTES = 512 * 1024 * 1024
SYNC_SECONDS = 5.0
#: fsyncs in flight at once where `syncfs` is not used: the journal commits them together.
FSYNC_THREADS = 4


class ItemFiles:
    """The files of one item attempt that were handed to the committer, and their fate."""

    def __init__(self, item_id: int) -> None:
        self.item_id = item_id
        self.bytes = 0
        self._submitted = 0
        self._settled = 0
        self._error: BaseException | None = None
        self._changed = threading.Condition()

    def _submit(self) -> None:
        with self._changed:
            self._submitted += 1

    def _settle(self, stored: StoredInstance | None, error: BaseException | None) -> None:
        with self._changed:
            self._settled += 1
            if stored is not None:
                self.bytes += stored.size
            if error is not None and self._error is None:
                self._error = error
            self._changed.notify_all()

    def wait(self) -> None:
        """Block until every handed-over file is recorded or failed; raise the first failure."""
        with self._changed:
            self._changed.wait_for(lambda: self._settled >= self._submitted)
            if self._error is not None:
                raise self._error


@dataclass
class _Job:
    files: ItemFiles
    stored: StoredInstance
    settled: bool = False

    def settle(self, error: BaseException | None) -> None:
        if not self.settled:
            self.settled = True
            self.files._settle(None if error else self.stored, error)


_CLOSE = object()
_HURRY = object()  # an item waits for its files: record what is queued now


class Committer:
    """Renames in the caller's thread, records in one thread, syncs in another; see the
    module docstring."""

    def __init__(
        self,
        storage: StorageDir,
        checkpoint: Checkpoint,
        progress: Progress,
        *,
        source: str,
        run_id: str,
    ) -> None:
        self.storage = storage
        self.checkpoint = checkpoint
        self.progress = progress
        self.source = source
        self.run_id = run_id
        self._queue: queue.Queue[_Job | object] = queue.Queue(maxsize=MAX_QUEUED)
        # what is recorded but not yet synced, shared with the sync thread
        self._due = threading.Condition()
        self._unsynced_files = 0
        self._unsynced_bytes = 0
        self._unsynced_since = 0.0
        self._unsynced_paths: list[Path] = []  # for the per-file fallback (`use_syncfs`)
        self._last_seq = 0
        self._closing = False
        self._sync_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="committer", daemon=True)
        self._syncer = threading.Thread(target=self._sync_loop, name="sync", daemon=True)
        self._thread.start()
        self._syncer.start()

    def submit(self, files: ItemFiles, staged: Path, stored: StoredInstance) -> None:
        """Put a complete, closed temp file in place now and queue its record (blocks while
        the queue is full). A file that cannot be placed fails its item, not the run."""
        files._submit()
        try:
            self.storage.install(staged, stored, sync_dir=False)
        except BaseException as error:
            staged.unlink(missing_ok=True)
            files._settle(None, error)
            return
        crash_point("after-rename")
        self._queue.put(_Job(files, stored))

    def close(self) -> None:
        """Record everything handed over so far, make it durable, then stop both threads.

        Raises OSError if the final sync (or an earlier one) failed: the run must not then
        claim success; the files stay listed as unsynced and the next run re-hashes them.
        """
        self._queue.put(_CLOSE)
        self._thread.join()
        with self._due:
            self._closing = True
            self._due.notify_all()
        self._syncer.join()
        if self._sync_error is not None:
            raise self._sync_error

    def __enter__(self) -> Committer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
            return
        with contextlib.suppress(OSError):  # already failing: keep that error, not this one
            self.close()

    # --- recording -----------------------------------------------------------------------

    def wait_for(self, files: ItemFiles) -> None:
        """Until every file of `files` handed over so far is recorded (see ItemFiles.wait);
        the committer stops waiting for more files to join its batch."""
        self._queue.put(_HURRY)
        files.wait()

    def _loop(self) -> None:
        closing = False
        while not closing:
            batch, closing = self._next_batch()
            try:
                self._record(batch)
            except BaseException as error:  # never leave a worker waiting for its files
                for job in batch:
                    job.settle(error)

    def _next_batch(self) -> tuple[list[_Job], bool]:
        """The files queued, waiting up to LINGER_SECONDS for more to join them; and
        whether the committer is closing."""
        batch: list[_Job] = []
        entry = self._queue.get()
        deadline = time.monotonic() + LINGER_SECONDS
        while True:
            if entry is _CLOSE:
                return batch, True
            if entry is _HURRY:
                deadline = 0.0
            else:
                assert isinstance(entry, _Job)
                batch.append(entry)
            if len(batch) >= MAX_BATCH:  # full: taking one more would lose it
                return batch, False
            try:
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, False

    def _record(self, batch: list[_Job]) -> None:
        """Record the batch, listed as unsynced, in one transaction; then tell the syncer."""
        if not batch:
            return
        by_item: dict[ItemFiles, list[StoredInstance]] = defaultdict(list)
        for job in batch:
            by_item[job.files].append(job.stored)
        try:
            seq = self.checkpoint.record_files_of_items(
                [(files.item_id, stored) for files, stored in by_item.items()],
                self.source,
                self.run_id,
                # object storage (issue 19): an acknowledged PUT is durable, nothing to sync
                durable=self.storage.is_remote,
            )
        except BaseException as error:
            # in place but not recorded: the item is fetched again, which is safe
            for job in batch:
                job.settle(error)
            return
        if self.storage.is_remote:
            for job in batch:
                job.settle(None)
                self.progress.instance_stored(job.stored.size)
            return
        size = sum(job.stored.size for job in batch)
        with self._due:
            if not self._unsynced_files:
                self._unsynced_since = time.monotonic()
            self._unsynced_files += len(batch)
            self._unsynced_paths.extend(job.stored.path for job in batch)
            self._unsynced_bytes += size
            self._last_seq = max(self._last_seq, seq)
            if self._unsynced_files >= SYNC_FILES or self._unsynced_bytes >= SYNC_BYTES:
                self._due.notify_all()
        for job in batch:
            job.settle(None)
            self.progress.instance_stored(job.stored.size)

    # --- syncing -------------------------------------------------------------------------

    def _sync_due(self) -> bool:
        if self._closing:
            return True
        if not self._unsynced_files:
            return False
        return (
            self._unsynced_files >= SYNC_FILES
            or self._unsynced_bytes >= SYNC_BYTES
            or time.monotonic() - self._unsynced_since >= SYNC_SECONDS
        )

    def _sync_loop(self) -> None:
        while True:
            with self._due:
                self._due.wait_for(self._sync_due, timeout=SYNC_SECONDS)
                if not self._sync_due():
                    continue
                closing, upto = self._closing, self._last_seq
                pending, paths = self._unsynced_files, self._unsynced_paths
                self._unsynced_files = self._unsynced_bytes = 0
                self._unsynced_paths = []
            if pending and self._sync_error is None:  # after a failed sync, trust no later one
                try:
                    self._sync(upto, paths)
                except BaseException as error:  # reported by close(); files stay unsynced
                    if self._sync_error is None:
                        self._sync_error = error
            if closing:
                return

    def _sync(self, upto: int, paths: list[Path]) -> None:
        """One sync of the output (and of the checkpoint, if it lives elsewhere), or where
        that is not safe an fsync of each file and folder; then the records up to `upto`
        are no longer unsynced."""
        crash_point("before-sync")
        if use_syncfs():
            for folder in _file_systems(self.storage.root, self.checkpoint.path.parent):
                sync_filesystem(folder)
        else:
            with ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="fsync") as pool:
                for _ in pool.map(fsync_path, paths):  # write-back began in the workers
                    pass
                for _ in pool.map(fsync_path, {path.parent for path in paths}):
                    pass
        self.checkpoint.mark_durable(upto)


@functools.cache
def use_syncfs() -> bool:
    """`syncfs` reports write-back errors only since Linux 5.8; before that (or without
    `syncfs`) each file and folder is fsynced instead, which reports them."""
    if not sys.platform.startswith("linux") or not hasattr(os, "uname"):
        return False
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


def _file_systems(*folders: Path) -> list[Path]:
    """One folder per file system among `folders`."""
    seen: dict[int, Path] = {}
    for folder in folders:
        seen.setdefault(os.stat(folder).st_dev, folder)
    return list(seen.values())


#: Read size when re-hashing unsynced files.
_HASH_CHUNK = 1024 * 1024


def recover_unsynced(root: Path, checkpoint: Checkpoint, logger: Any = None) -> int:
    """After a crash or power cut: check the files recorded since the last sync.

    Each is re-hashed; one that is missing, shorter, or different is forgotten and its item
    reopened (fetched again). Those that match are synced before the list is cleared, since
    after a mere crash they may still be only in memory. Returns how many were lost.
    """
    if not checkpoint.has_unsynced():
        return 0
    records = checkpoint.unsynced_files()
    lost: dict[int, list[str]] = defaultdict(list)
    for record in records:
        if not _matches(root / record.path, record.size, record.sha256):
            lost[record.item_id].append(record.sop_instance_uid)
    for folder in _file_systems(root, checkpoint.path.parent):
        sync_filesystem(folder)
    checkpoint.settle_unsynced(lost, "file lost before it was synced (crash or power cut)")
    count = sum(len(uids) for uids in lost.values())
    if logger is not None:
        logger.info(
            "storage.unsynced_checked", files=len(records), lost=count, items_reopened=len(lost)
        )
    return count


def _matches(path: Path, size: int, sha256: str) -> bool:
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size != size:
                return False
            digest = hashlib.sha256()
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return False
    return digest.hexdigest() == sha256
