"""Making received files durable and visible in batches, off the download threads.

Download workers only write each temp file, start its writeback to disk and close it, then
hand it here. One committer thread takes whatever has queued up and, per batch: fsyncs each
file (by then mostly on disk), renames it into the layout, fsyncs the folders it touched,
and records the whole batch in the checkpoint in one transaction. Workers keep receiving
while the disk catches up: an fsync per file in the worker itself took most of its time.

An item is marked done only after all its files are recorded (`ItemFiles.wait`). The queue
is bounded, so a disk slower than the network slows the download down instead of filling the
temp folder. A crash anywhere leaves either temp files (removed by the next run) or renamed
files the checkpoint does not know yet (fetched again by the next run), never a record of a
file that is not durably in place.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from trolley_etl.core.storage import StorageDir, StoredInstance, fsync_dir, fsync_file
from trolley_etl.runner.checkpoint import Checkpoint
from trolley_etl.runner.faults import crash_point
from trolley_etl.runner.progress import Progress

#: Files waiting for the committer, at most; bounds the temp folder and what a crash loses.
MAX_QUEUED = 512
#: fsyncs in flight at once: the disk works on several files, the journal commits them together.
SYNC_THREADS = 4
#: Files per batch, at most (one checkpoint transaction, one fsync per folder).
MAX_BATCH = 512


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
    staged: Path
    stored: StoredInstance
    synced: Future[BaseException | None]  # the file's fsync, started when it was handed over
    settled: bool = False

    def settle(self, error: BaseException | None) -> None:
        if not self.settled:
            self.settled = True
            self.files._settle(None if error else self.stored, error)


_CLOSE = object()


def _fsync_or_error(path: Path) -> BaseException | None:
    try:
        fsync_file(path)
    except BaseException as error:
        return error
    return None


class Committer:
    """The single thread that fsyncs, renames and records; see the module docstring."""

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
        self._syncers = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="fsync")
        self._thread = threading.Thread(target=self._loop, name="committer", daemon=True)
        self._thread.start()

    def submit(self, files: ItemFiles, staged: Path, stored: StoredInstance) -> None:
        """Hand over a complete, closed temp file (blocks while the queue is full)."""
        files._submit()
        self._queue.put(_Job(files, staged, stored, self._syncers.submit(_fsync_or_error, staged)))

    def close(self) -> None:
        """Commit everything handed over so far, then stop the thread."""
        self._queue.put(_CLOSE)
        self._thread.join()
        self._syncers.shutdown()

    def __enter__(self) -> Committer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _loop(self) -> None:
        closing = False
        while not closing:
            batch: list[_Job] = []
            entry = self._queue.get()
            while True:
                if entry is _CLOSE:
                    closing = True
                    break
                assert isinstance(entry, _Job)
                batch.append(entry)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                self._commit(batch)
            except BaseException as error:  # never leave a worker waiting for its files
                for job in batch:
                    job.settle(error)

    def _commit(self, batch: list[_Job]) -> None:
        """fsync (already under way), rename, fsync the folders, record: in that order, so
        that the checkpoint never names a file whose content or place is not durable."""
        placed: list[_Job] = []
        for job in batch:
            try:
                sync_error = job.synced.result()
                if sync_error is not None:
                    raise sync_error
                self.storage.install(job.staged, job.stored, sync_dir=False)
            except BaseException as error:
                job.staged.unlink(missing_ok=True)
                job.settle(error)
                continue
            crash_point("after-rename")
            placed.append(job)
        by_item: dict[ItemFiles, list[StoredInstance]] = defaultdict(list)
        for job in placed:
            by_item[job.files].append(job.stored)
        try:
            # object storage (issue 19): nothing renamed, no folder to sync
            folders = (
                set() if self.storage.is_remote else {job.stored.path.parent for job in placed}
            )
            for _ in self._syncers.map(fsync_dir, folders):  # together: one journal commit
                pass
            self.checkpoint.record_files_of_items(
                [(files.item_id, stored) for files, stored in by_item.items()],
                self.source,
                self.run_id,
            )
        except BaseException as error:
            # in place but not recorded: the item is fetched again, which is safe
            for job in placed:
                job.settle(error)
            return
        for job in placed:
            job.settle(None)
            self.progress.instance_stored(job.stored.size)
