"""The runner: a manifest executed step by step (search, expand, download, verify, report).

State lives in the checkpoint, so a run can be stopped at any moment (SIGINT, SIGKILL, a
power cut) and resumed: resolved items are not searched again, done items are not contacted
again, and every file on disk was complete before it got its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trolley_etl import __version__
from trolley_etl.core.errors import TrolleyError
from trolley_etl.core.storage import StagedFile, StorageDir
from trolley_etl.core.trolley import Trolley
from trolley_etl.manifest import Manifest
from trolley_etl.runner import lockfile, report, resolve, window
from trolley_etl.runner.backends import build_backends, describe_source
from trolley_etl.runner.checkpoint import (
    FAILED,
    PENDING,
    Checkpoint,
    Item,
    StudyRow,
    open_checkpoint,
    state_dir,
)
from trolley_etl.runner.committer import Committer, ItemFiles
from trolley_etl.runner.faults import crash_point
from trolley_etl.runner.logs import RunLog
from trolley_etl.runner.progress import Progress
from trolley_etl.runner.resolve import Found
from trolley_etl.runner.retry import backoff_delay, is_retryable
from trolley_etl.runner.search_cache import CachingSearcher


class ManifestChangedError(TrolleyError):
    """The checkpoint was resolved from a manifest that would pull something else."""


class LockOutdatedError(ManifestChangedError):
    """The lock file was made for a manifest that pulled something else."""


class RunInterrupted(TrolleyError):
    """SIGINT or SIGTERM: the run stopped between files; the checkpoint is consistent."""


class RootBusyError(TrolleyError):
    """Another run holds the lock on this storage root."""


@dataclass
class RunOptions:
    root: Path | None = None
    workers: int | None = None
    refresh: bool = False
    dry_run: bool = False
    quiet: bool = False
    progress: bool = True
    run_id: str | None = None
    purpose: str = "run"  # "repair" when `verify --repair` re-downloads broken files
    ignore_window: bool = False  # contact the archive even outside run.window
    no_wait: bool = False  # outside run.window: stop (OutsideWindowError) instead of waiting


@dataclass
class RunResult:
    run_id: str
    status: str  # "complete", "failed", "interrupted", "dry-run"
    counts: dict[str, int]
    failed: list[dict[str, Any]] = field(default_factory=list)
    report_path: Path | None = None


def new_run_id() -> str:
    """Sortable by start time, unique enough for one storage root."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def manifest_file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def root_lock(root: Path) -> Iterator[None]:
    """One run per storage root: a second one fails at once instead of interleaving."""
    path = state_dir(root) / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RootBusyError(f"another trolley-etl run is using {root}") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class Runner:
    def __init__(self, manifest: Manifest, manifest_path: Path, log: RunLog,
                 options: RunOptions) -> None:  # fmt: skip
        self.manifest = manifest
        self.manifest_path = manifest_path
        self.options = options
        self.root = (options.root or manifest.storage_root).absolute()
        self.workers = options.workers or manifest.run.workers
        self.attempts_per_run = manifest.run.retries + 1
        self.run_id = options.run_id or new_run_id()
        self.log = log
        self.stop = threading.Event()
        self.storage = StorageDir(self.root, manifest.storage.layout)
        self.source = describe_source(manifest.source.effective_download)
        self.lock_path = lockfile.lock_path_for(manifest_path)
        self.gate = window.gate_for(manifest.run.window, ignore=options.ignore_window,
                                    log=log.logger, state_dir=state_dir(self.root),
                                    run_id=self.run_id, stop=self.stop,
                                    no_wait=options.no_wait)  # fmt: skip

    # --- steps -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, name: str, **fields: Any) -> Iterator[dict[str, Any]]:
        self.log.bind(step=name)
        started = time.monotonic()
        self.log.logger.info("step.start", **fields)
        outcome: dict[str, Any] = {}
        yield outcome
        self.log.logger.info("step.end", duration_s=round(time.monotonic() - started, 3), **outcome)

    def _trolley(self, checkpoint: Checkpoint | None = None) -> Trolley:
        searcher, downloader = build_backends(self.manifest, self.log.logger)
        if checkpoint is not None and self.manifest.run.cache_searches:
            cache = CachingSearcher(searcher, checkpoint.path)
            if self.options.refresh:
                cache.clear()
            searcher = cache
        return Trolley(
            searcher=searcher, downloader=downloader, storage=self.storage, workers=self.workers
        )

    def resolve(self, trolley: Trolley) -> tuple[list[resolve.Found], list[Any]]:
        with self.step("search", query_sets=len(self.manifest.queries)) as outcome:

            def on_query(query_set: str, query: Any, count: int) -> None:
                self.log.logger.info("search.query", query_set=query_set,
                                     filters=dict(query.filters), studies=count)  # fmt: skip

            found = resolve.search(trolley, self.manifest, on_query)
            crash_point("after-search")
            outcome["studies"] = len(found)
        with self.step("expand", studies=len(found)) as outcome:
            kept, references = resolve.expand(trolley, self.manifest, found, self.workers)
            outcome.update(studies=len(kept), items=len(references),
                           dropped=len(found) - len(kept))  # fmt: skip
        return kept, references

    def plan_only(self) -> RunResult:
        """Search and expand without writing anything (plan, run --dry-run)."""
        self.log.bind(run_id=self.run_id, manifest=self.manifest.name, step="start")
        with self._trolley() as trolley:
            kept, references = self.resolve(trolley)
        self.found, self.references = kept, references
        return RunResult(self.run_id, "dry-run", {"studies": len(kept), "items": len(references)})

    def run(self) -> RunResult:
        self.log.bind(run_id=self.run_id, manifest=self.manifest.name, step="start")
        if self.options.no_wait:
            window.check_no_wait(self.manifest.run.window, ignore=self.options.ignore_window)
        with root_lock(self.root):
            checkpoint = open_checkpoint(self.root)
            try:
                return self._run_locked(checkpoint)
            finally:
                checkpoint.close()

    def _run_locked(self, checkpoint: Checkpoint) -> RunResult:
        wanted = resolve.resolution_hash(self.manifest)
        recorded = checkpoint.get_meta("resolution_hash")
        lock = None if self.options.refresh else self._read_lock(wanted)
        lock_sha = lockfile.lock_hash(self.lock_path) if lock is not None else None
        if recorded is not None and recorded != wanted and not self.options.refresh:
            raise ManifestChangedError(
                f"the manifest changed since the checkpoint in {state_dir(self.root)} was made "
                "(what it pulls is different); run with --refresh to re-resolve it, or use "
                "another storage root"
            )
        self._remove_stale_temp_files()
        provenance = report.run_provenance(
            self.manifest, self.manifest_path, self.root, purpose=self.options.purpose,
            lock_path=self.lock_path if lock is not None else None, lock_sha256=lock_sha,
        )  # fmt: skip
        checkpoint.start_run(self.run_id, manifest_file_hash(self.manifest_path), provenance)
        self.log.logger.info("run.start", root=str(self.root), workers=self.workers,
                             source=self.source, version=__version__,
                             lock=str(self.lock_path) if lock is not None else None)  # fmt: skip
        trolley = self._trolley(checkpoint)
        try:
            if self.gate is not None:
                self.gate.hold()  # a run started outside its window waits for it
            locked_differently = lock is not None and checkpoint.get_meta("lock_hash") != lock_sha
            if lock is not None and (recorded is None or locked_differently):
                self._resolve_from_lock(trolley, checkpoint, lock, wanted)
                checkpoint.set_meta("lock_hash", lock_sha or "")
            elif recorded is None or self.options.refresh:
                kept, references = self.resolve(trolley)
                saved = checkpoint.save_resolution(
                    wanted, [resolve.study_row(f) for f in kept], references
                )
                crash_point("after-resolution")
                self.log.logger.info("checkpoint.resolved", items=saved)
                checkpoint.set_meta("lock_hash", self._rewrite_lock(checkpoint, kept, references))
            else:
                self.log.logger.info("checkpoint.resume", **checkpoint.counts())
            self._download(trolley, checkpoint)
            failed_on_disk = self._verify(checkpoint)
        except KeyboardInterrupt:
            self.stop.set()
            return self._finish(checkpoint, "interrupted")
        except RunInterrupted:
            return self._finish(checkpoint, "interrupted")
        except window.OutsideWindowError:  # --no-wait: stopped when the window closed
            self._finish(checkpoint, "interrupted")
            raise
        finally:
            trolley.close()
        status = "complete" if not failed_on_disk and not checkpoint.items([FAILED, PENDING]) \
            else "failed"  # fmt: skip
        return self._finish(checkpoint, status)

    # --- lock file ---------------------------------------------------------------------------

    def _read_lock(self, wanted: str) -> lockfile.Lock | None:
        """The lock beside the manifest, if any; refused when made for another manifest."""
        if not self.lock_path.exists():
            return None
        lock = lockfile.read_lock(self.lock_path)
        if lock.manifest_hash != wanted:
            raise LockOutdatedError(
                f"{self.lock_path} was written for another version of the manifest (what it "
                "pulls changed since); run `trolley-etl lock` to lock it again, or "
                "`run --refresh` to re-resolve and rewrite the lock"
            )
        return lock

    def _resolve_from_lock(self, trolley: Trolley, checkpoint: Checkpoint,
                           lock: lockfile.Lock, wanted: str) -> None:  # fmt: skip
        """Pull exactly what the lock lists; search only to report how the archive drifted."""
        clear = getattr(trolley.searcher, "clear", None)
        if callable(clear):
            clear()  # compare with the archive as it is now, not with cached answers
        with self.step("search", query_sets=len(self.manifest.queries),
                       lock=str(self.lock_path)) as outcome:  # fmt: skip

            def on_query(query_set: str, query: Any, count: int) -> None:
                self.log.logger.info("search.query", query_set=query_set,
                                     filters=dict(query.filters), studies=count)  # fmt: skip

            found = resolve.search(trolley, self.manifest, on_query)
            crash_point("after-search")
            outcome["studies"] = len(found)
        current: dict[str, set[str]] = {}
        for item in found:
            current.setdefault(item.query_set, set()).add(item.study.uid)
        drift = lockfile.diff(lock, current)
        if drift.changed:
            self.log.logger.warning("lock.drift", lock=str(self.lock_path), **drift.to_json())
        else:
            self.log.logger.info("lock.matches", lock=str(self.lock_path), studies=len(found))
        checkpoint.add_run_provenance(self.run_id, lock_drift=drift.to_json())
        searched = {item.study.uid: item for item in found}
        rows = []
        for study_uid, query_set in sorted(lock.study_owners().items()):
            seen = searched.get(study_uid)
            row = resolve.study_row(seen) if seen else StudyRow(study_uid, query_set)
            rows.append(StudyRow(study_uid, query_set, *dataclasses.astuple(row)[2:]))
        saved = checkpoint.save_resolution(wanted, rows, lock.references())
        crash_point("after-resolution")
        self.log.logger.info("checkpoint.resolved", items=saved, from_lock=str(self.lock_path))

    def _rewrite_lock(self, checkpoint: Checkpoint, kept: list[Found],
                      references: list[Any]) -> str:  # fmt: skip
        """`run --refresh` rewrites an existing lock; returns its hash ("" for no lock)."""
        if not (self.options.refresh and self.lock_path.exists()):
            return ""
        fresh = lockfile.Lock.from_resolution(
            self.manifest.name, resolve.resolution_hash(self.manifest),
            [(f.query_set, f.study.uid) for f in kept], references,
        )  # fmt: skip
        changed = lockfile.write_lock(self.lock_path, fresh)
        sha = lockfile.lock_hash(self.lock_path)
        self.log.logger.info("lock.written" if changed else "lock.unchanged",
                             lock=str(self.lock_path), sha256=sha)  # fmt: skip
        checkpoint.add_run_provenance(self.run_id, lock_path=str(self.lock_path.absolute()),
                                      lock_sha256=sha)  # fmt: skip
        return sha

    def _remove_stale_temp_files(self) -> None:
        """Temp files of a killed run: incomplete by definition, and this run holds the lock."""
        removed = 0
        for stale in self.storage.tmp_dir.glob("*.part") if self.storage.tmp_dir.exists() else []:
            stale.unlink(missing_ok=True)
            removed += 1
        if removed:
            self.log.logger.info("storage.temp_removed", files=removed)

    # --- download ----------------------------------------------------------------------------

    def _download(self, trolley: Trolley, checkpoint: Checkpoint) -> None:
        todo = checkpoint.items([PENDING, FAILED])
        with self.step("download", items=len(todo), workers=self.workers) as outcome:
            progress = Progress(len(todo), enabled=self.options.progress and not self.options.quiet)
            pending = iter(todo)
            running: dict[Future[None], Item] = {}
            committer = Committer(self.storage, checkpoint, progress, source=self.source,
                                  run_id=self.run_id)  # fmt: skip

            def drain() -> None:  # outside the window: the units in flight finish first
                while running:
                    self._collect(running, progress)

            with (
                committer,
                ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="item") as pool,
            ):
                try:
                    for item in pending:  # bounded: at most 2 x workers submitted at once
                        if self.gate is not None:
                            self.gate.hold(drain)
                        running[
                            pool.submit(self._fetch_item, trolley, checkpoint, item, committer)
                        ] = item
                        while len(running) >= 2 * self.workers:
                            self._collect(running, progress)
                    while running:
                        self._collect(running, progress)
                except KeyboardInterrupt:
                    self.stop.set()
                    self.log.logger.warning("run.interrupted", waiting_for=len(running))
                    wait(running)
                    progress.close()
                    raise
            progress.close()
            outcome.update(instances=progress.instances, bytes=progress.bytes)

    def _collect(self, running: dict[Future[None], Item], progress: Progress) -> None:
        done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
        for future in done:
            running.pop(future)
            future.result()
            progress.item_finished()

    def _fetch_item(self, trolley: Trolley, checkpoint: Checkpoint, item: Item,
                    committer: Committer) -> None:  # fmt: skip
        ref = item.reference
        uids = {"study_uid": ref.study_uid, **_deeper_uids(ref)}
        for attempt in range(1, self.attempts_per_run + 1):
            if self.stop.is_set():
                return
            started = time.monotonic()
            sink = _CheckpointSink(self, committer, item.item_id)
            try:
                # plan again: a downloader that batches (RAD-69) gets its instance lists
                count = sum(trolley.downloader.fetch(unit, sink) for unit in trolley.plan([ref]))
                if count == 0:
                    raise TrolleyError(f"the archive sent no instances for {ref}")
                sink.wait()  # every file of the item is recorded before it is marked done
                crash_point("before-item-done")
                checkpoint.mark_done(item.item_id)
                self.log.logger.info("item.done", **uids, instances=count, bytes=sink.bytes,
                                     attempt=attempt,
                                     duration_s=round(time.monotonic() - started, 3))  # fmt: skip
                return
            except _Stopped:
                sink.wait_quietly()
                return
            except Exception as error:
                sink.wait_quietly()
                retry = is_retryable(error) and attempt < self.attempts_per_run
                self.log.logger.warning(
                    "item.retry" if retry else "item.failed", **uids, attempt=attempt,
                    error_type=type(error).__name__, error=str(error),
                )  # fmt: skip
                if not retry:
                    checkpoint.mark_failed(item.item_id, f"{type(error).__name__}: {error}")
                    return
                if self.stop.wait(backoff_delay(attempt, error)):
                    return

    # --- verify and report -----------------------------------------------------------------

    def _verify(self, checkpoint: Checkpoint) -> int:
        """Every recorded file is on disk with its recorded size.

        Content needs no second look here: each file was hashed as it streamed and its header
        read before it was renamed into place. `trolley-etl verify` re-hashes everything.
        """
        problems = 0
        with self.step("verify") as outcome:
            checked = 0
            for record in checkpoint.files():
                path = self.root / record["path"]
                checked += 1
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    size = -1
                if size != record["size"]:
                    problems += 1
                    reason = "missing" if size < 0 else f"size {size} != recorded {record['size']}"
                    self.log.logger.error("verify.bad_file", path=record["path"], reason=reason,
                                          sop_instance_uid=record["sop_instance_uid"])  # fmt: skip
                    checkpoint.forget_files([record["sop_instance_uid"]])
                    checkpoint.mark_pending(record["item_id"], f"file {reason}: {record['path']}")
            outcome.update(files=checked, problems=problems)
        return problems

    def _finish(self, checkpoint: Checkpoint, status: str) -> RunResult:
        counts = checkpoint.counts()
        failed = [
            {"study_uid": i.reference.study_uid, **_deeper_uids(i.reference),
             "attempts": i.attempts, "error": i.last_error}
            for i in checkpoint.items([FAILED])
        ]  # fmt: skip
        self.log.bind(step="report")
        checkpoint.finish_run(self.run_id, status, counts)
        # the audit report of the whole root after this run, and the checksums beside the data
        audit = report.build_report(checkpoint, self.manifest, self.manifest_path, self.root)
        audit.update(run_id=self.run_id, status=status, counts=counts, failed=failed)
        report_path = report.save_report(self.root, report.report_json(audit),
                                         f"{self.run_id}.json")  # fmt: skip
        bag = report.write_bag_manifests(self.root, checkpoint.files(), self.manifest.name)
        self.log.logger.info("report.written", report=str(report_path),
                             bag_manifest=str(self.root / report.BAG_MANIFEST), bagit=bag,
                             **audit["summary"]["by_status"])  # fmt: skip
        self.log.logger.info("run.end", status=status, **counts, report=str(report_path))
        return RunResult(self.run_id, status, counts, failed, report_path)


def _deeper_uids(ref: Any) -> dict[str, str]:
    uids = {}
    if getattr(ref, "series_uid", ""):
        uids["series_uid"] = ref.series_uid
    if getattr(ref, "instance_uid", ""):
        uids["instance_uid"] = ref.instance_uid
    return uids


class _Stopped(Exception):
    """The run is stopping: abandon the file being received."""


class _CheckpointWriter:
    def __init__(self, sink: _CheckpointSink) -> None:
        self._sink = sink
        self._staged: StagedFile = sink.runner.storage.open_instance()

    def write(self, chunk: bytes) -> None:
        if self._sink.runner.stop.is_set():
            raise _Stopped()
        self._staged.write(chunk)

    def commit(self) -> None:
        stored = self._staged.finish(sync=False)  # the committer fsyncs it before the rename
        self._sink.committer.submit(self._sink.files, self._staged.path, stored)

    def abort(self) -> None:
        self._staged.abort()


class _CheckpointSink:
    """Stores through the runner's StorageDir; the committer makes the files durable, puts
    them in place and records them in the checkpoint (see `runner.committer`)."""

    def __init__(self, runner: Runner, committer: Committer, item_id: int) -> None:
        self.runner = runner
        self.committer = committer
        self.files = ItemFiles(item_id)

    @property
    def bytes(self) -> int:
        return self.files.bytes

    def open_instance(self) -> _CheckpointWriter:
        return _CheckpointWriter(self)

    def wait(self) -> None:
        """Until every file received so far is recorded; raises if one could not be."""
        self.files.wait()

    def wait_quietly(self) -> None:
        """After a failure: let the files already received be recorded; if that fails too,
        they are merely unknown to the checkpoint, which is safe (the item is fetched
        again)."""
        with contextlib.suppress(Exception):
            self.files.wait()
