"""The runner: a manifest executed step by step (search, expand, download, verify, report).

State lives in the checkpoint, so a run can be stopped at any moment (SIGINT, SIGKILL, a
power cut) and resumed: resolved items are not searched again, done items are not contacted
again, and every file on disk was complete before it got its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trolley_etl import __version__
from trolley_etl.backends.limits import DEFAULT_MAX_CONNECTIONS
from trolley_etl.core.arrival import CheckedSink, disk_full_error
from trolley_etl.core.backend import Downloader, Searcher
from trolley_etl.core.engine import execute
from trolley_etl.core.errors import (
    DiskFullError,
    IncompleteUnitError,
    LayoutChangedError,
    LockOutdatedError,
    ManifestChangedError,
    OutsideWindowError,
    RootBusyError,
    TrolleyError,
)
from trolley_etl.core.files import file_sha256
from trolley_etl.core.interrupts import abort_transfers
from trolley_etl.core.model import InstanceReference, QueryLevel, SeriesReference, Study
from trolley_etl.core.objectstore import ObjectStorageDir, copy_tag_files, object_storage
from trolley_etl.core.privacy import prepare_root
from trolley_etl.core.relative_dates import resolved_ranges
from trolley_etl.core.storage import StagedFile, StorageDir
from trolley_etl.core.trolley import Trolley
from trolley_etl.deid.audit import SETTINGS_KEY as DEID_SETTINGS_KEY
from trolley_etl.deid.audit import quarantined_in
from trolley_etl.manifest import Manifest
from trolley_etl.reports.run_report import RunChanges, run_report
from trolley_etl.runner import lockfile, rejections, relayout, report, resolve, window
from trolley_etl.runner.atomic import remove_stale_temp_files
from trolley_etl.runner.backends import build_backends, describe_source
from trolley_etl.runner.bounds import retrying
from trolley_etl.runner.checkpoint import (
    FAILED,
    INCOMPLETE,
    PENDING,
    TODO_STATES,
    Checkpoint,
    Item,
    RunState,
    StudyRow,
    open_checkpoint,
    state_dir,
)
from trolley_etl.runner.cohort import Cohort, allowed_unmatched, cohort_json, refused_unmatched
from trolley_etl.runner.committer import Committer, ItemFiles, recover_unsynced
from trolley_etl.runner.faults import crash_point
from trolley_etl.runner.logs import RunLog
from trolley_etl.runner.progress import Progress
from trolley_etl.runner.rejections import log_rejected
from trolley_etl.runner.resolve import Found, Planned, Searched
from trolley_etl.runner.retry import backoff_delay, is_retryable
from trolley_etl.runner.search_cache import CachingSearcher

if TYPE_CHECKING:  # the de-identification engine is loaded by the runs that use it
    from trolley_etl.deid.engine import Deidentifier

#: Builds the searcher and downloader of a manifest (tests pass in-memory fakes).
BackendFactory = Callable[[Manifest], tuple[Searcher | None, Downloader]]


@dataclass
class RunOptions:
    root: Path | None = None
    workers: int | None = None
    refresh: bool = False
    dry_run: bool = False
    quiet: bool = False
    progress: bool = True
    progress_lines: bool = False  # `--no-progress` on a terminal: plain lines, no redraws
    run_id: str | None = None
    purpose: str = "run"  # "repair" when `verify --repair` re-downloads broken files
    ignore_window: bool = False  # contact the archive even outside run.window
    no_wait: bool = False  # outside run.window: stop (OutsideWindowError) instead of waiting
    state_dir: Path | None = None  # issue 19: the checkpoint's folder for an object-storage root
    executor: str | None = None  # issue 19: threads | dask (overrides run.executor)
    scheduler: str | None = None  # issue 19: Dask scheduler address (overrides run.scheduler)


@dataclass
class RunResult:
    run_id: str
    status: str  # a RunState value, or "dry-run"
    counts: dict[str, int]
    failed: list[dict[str, Any]] = field(default_factory=list)
    report_path: Path | None = None
    incomplete: list[dict[str, Any]] = field(default_factory=list)
    unmatched: list[dict[str, Any]] = field(default_factory=list)  # refused rows


def new_run_id() -> str:
    """Sortable by start time, unique enough for one storage root."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def manifest_file_hash(path: Path) -> str:
    return file_sha256(path)


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
    def __init__(
        self,
        manifest: Manifest,
        manifest_path: Path,
        log: RunLog,
        options: RunOptions,
        backends: BackendFactory | None = None,
    ) -> None:
        self.backends: BackendFactory = backends or self._build_backends
        self.manifest = manifest
        self.manifest_path = manifest_path
        self.options = options
        self.root = (options.root or manifest.storage_root).absolute()
        if manifest.object_root is not None and options.root is None and options.state_dir:
            self.root = options.state_dir.absolute()  # issue 19: `--state-dir`
        self.workers = options.workers or manifest.run.workers
        self.attempts_per_run = manifest.run.retries + 1
        self.run_id = options.run_id or new_run_id()
        self.log = log
        self.stop = threading.Event()
        self.storage = StorageDir(
            self.root, manifest.storage.layout, file_format=manifest.source.file_format
        )
        if manifest.object_root is not None and options.root is None:  # issue 19: s3://
            self.storage = object_storage(manifest, self.root)
        self.source = describe_source(manifest.source.effective_download)
        self.lock_path = lockfile.lock_path_for(manifest_path)
        self.deid: Deidentifier | None = None  # set up once the checkpoint is open
        self.max_object_bytes = manifest.run.limits.max_object_mb << 20
        # issue 19: where units run; a scheduler alone means dask
        self.scheduler = options.scheduler or manifest.run.scheduler
        self.executor = options.executor or ("dask" if options.scheduler else manifest.run.executor)
        self._dask: Any = None  # the DaskExecutor while units run on a cluster
        self.gate = window.gate_for(
            manifest.run.window,
            ignore=options.ignore_window,
            log=log.logger,
            state_dir=state_dir(self.root),
            run_id=self.run_id,
            stop=self.stop,
            no_wait=options.no_wait,
        )

    # --- steps -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def step(self, name: str, **fields: Any) -> Iterator[dict[str, Any]]:
        self.log.bind(step=name)
        started = time.monotonic()
        self.log.logger.info("step.start", **fields)
        outcome: dict[str, Any] = {}
        yield outcome
        self.log.logger.info("step.end", duration_s=round(time.monotonic() - started, 3), **outcome)

    def _build_backends(self, manifest: Manifest) -> tuple[Searcher | None, Downloader]:
        """The manifest's backends; transfers stop at once when the run is stopped."""
        return build_backends(manifest, self.stop, self.log.logger)

    def _trolley(self, checkpoint: Checkpoint | None = None) -> Trolley:
        searcher, downloader = self.backends(self.manifest)
        if searcher is not None:
            searcher = retrying(searcher, self.manifest, self.stop)  # issue 13: searches retry
        if searcher is not None and checkpoint is not None and self.manifest.run.cache_searches:
            cache = CachingSearcher(searcher, checkpoint.path)
            if self.options.refresh:
                cache.clear()
            searcher = cache
        return Trolley(
            searcher=searcher, downloader=downloader, storage=self.storage, workers=self.workers
        )

    def search(self, trolley: Trolley) -> Searched:
        """Step 1: every query set searched, with what each row matched."""
        with self.step("search", query_sets=len(self.manifest.queries)) as outcome:

            def on_query(query_set: str, query: Any, count: int) -> None:
                self.log.logger.info(
                    "search.query", query_set=query_set, filters=dict(query.filters), studies=count
                )

            searched = resolve.search_cohort(trolley, self.manifest, on_query)
            crash_point("after-search")
            outcome["studies"] = len(searched.found)
        self._log_cohort(searched.cohort)
        return searched

    def _log_cohort(self, cohort: Cohort) -> None:
        for name, account in cohort.items():
            for miss in account.unmatched:
                log = self.log.logger.info if account.allow_unmatched else self.log.logger.error
                log(
                    "cohort.unmatched",
                    query_set=name,
                    row=miss.row,
                    value=miss.value,
                    allowed=account.allow_unmatched,
                )
            if account.empty_queries:
                self.log.logger.warning(
                    "cohort.empty_query", query_set=name, queries=account.empty_queries
                )

    def plan(self, trolley: Trolley, searched: Searched) -> Planned:
        """Step 2: `select` applied, the retrieval units and what each holds."""
        with self.step("expand", studies=len(searched.found)) as outcome:
            planned = resolve.plan_units(trolley, self.manifest, searched, self.workers)
            outcome.update(
                studies=len(planned.kept),
                items=len(planned.references),
                dropped=len(searched.found) - len(planned.kept),
            )
        for name, account in searched.cohort.items():
            for drop in account.dropped_by_select:
                self.log.logger.info("select.dropped", query_set=name, **drop.to_json())
        self.invalid_rows = log_rejected(self.log.logger)  # issue 13: bad UIDs never fetched
        return planned

    def resolve(self, trolley: Trolley) -> tuple[list[resolve.Found], list[Any]]:
        planned = self.plan(trolley, self.search(trolley))
        return planned.kept, planned.references

    def plan_only(self) -> RunResult:
        """Search and expand without writing anything (plan, run --dry-run)."""
        self.log.bind(run_id=self.run_id, manifest=self.manifest.name, step="start")
        with self._trolley() as trolley:
            searched = self.search(trolley)
            planned = self.plan(trolley, searched)
        self.found, self.references = planned.kept, planned.references
        self.planned, self.cohort = planned, searched.cohort
        counts = {"studies": len(planned.kept), "items": len(planned.references)}
        return RunResult(self.run_id, "dry-run", counts)

    def run(self) -> RunResult:
        self.log.bind(run_id=self.run_id, manifest=self.manifest.name, step="start")
        if self.options.no_wait:
            window.check_no_wait(self.manifest.run.window, ignore=self.options.ignore_window)
        prepare_root(self.storage, self.manifest.storage.permissions)  # issue 13: private
        if isinstance(self.storage, ObjectStorageDir):  # issue 19: the bucket, before the archive
            self.storage.store.check()
        if self.executor == "dask":
            from trolley_etl.runner.executors.dask_executor import check_manifest

            check_manifest(self.manifest)
        with root_lock(self.root):
            checkpoint = open_checkpoint(self.root)
            try:
                return self._run_locked(checkpoint)
            finally:
                if self.deid is not None:
                    self.deid.close()
                checkpoint.close()

    def _prepare_deid(self, checkpoint: Checkpoint) -> Deidentifier | None:
        """The run's de-identification; a plain run into a plain root loads none of it."""
        if self.manifest.deid is None and checkpoint.get_meta(DEID_SETTINGS_KEY) is None:
            return None
        from trolley_etl.deid.engine import prepare  # checks a de-identified root too

        return prepare(
            self.manifest.deid,
            base_dir=self.manifest.base_dir,
            root=self.root,
            checkpoint=checkpoint,
            run_id=self.run_id,
            logger=self.log.logger,
        )

    def _run_locked(self, checkpoint: Checkpoint) -> RunResult:
        self.deid = self._prepare_deid(checkpoint)
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
        # issue 17: files recorded after the last sync of a killed run may be lost: re-hash
        recover_unsynced(self.root, checkpoint, self.log.logger)
        self._check_layout(checkpoint)
        self._remove_stale_temp_files()
        provenance = report.run_provenance(
            self.manifest,
            self.manifest_path,
            self.root,
            purpose=self.options.purpose,
            lock_path=self.lock_path if lock is not None else None,
            lock_sha256=lock_sha,
        )
        checkpoint.start_run(self.run_id, manifest_file_hash(self.manifest_path), provenance)
        self.log.logger.info(
            "run.start",
            root=str(self.root),
            workers=self.workers,
            source=self.source,
            version=__version__,
            lock=str(self.lock_path) if lock is not None else None,
        )
        try:
            trolley = self._trolley(checkpoint)
        except BaseException:
            checkpoint.finish_run(self.run_id, RunState.ABORTED.value, checkpoint.counts())
            raise
        try:
            if self.gate is not None:
                self.gate.hold()  # a run started outside its window waits for it
            locked_differently = lock is not None and checkpoint.get_meta("lock_hash") != lock_sha
            if lock is not None and (recorded is None or locked_differently):
                self._resolve_from_lock(trolley, checkpoint, lock, wanted)
                checkpoint.set_meta("lock_hash", lock_sha or "")
            elif recorded is None or self.options.refresh:
                searched = self.search(trolley)
                planned = self.plan(trolley, searched)
                saved = checkpoint.save_resolution(
                    wanted,
                    [resolve.study_row(f) for f in planned.kept],
                    planned.references,
                    planned.expectations,
                )
                checkpoint.set_meta("cohort", cohort_json(searched.cohort))
                crash_point("after-resolution")
                self.log.logger.info("checkpoint.resolved", items=saved)
                rejections.remember(checkpoint, self.run_id, self.invalid_rows)  # issue 13
                checkpoint.set_meta("lock_hash", self._rewrite_lock(checkpoint, planned))
            else:
                self.log.logger.info("checkpoint.resume", **checkpoint.counts())
            self._download(trolley, checkpoint)
            failed_on_disk = self._verify(checkpoint)
        except KeyboardInterrupt:
            self.stop.set()
            return self._finish(checkpoint, RunState.INTERRUPTED)
        except DiskFullError:  # issue 13: not retried; the run is failed, the rerun resumes
            self.stop.set()
            with contextlib.suppress(Exception):  # the checkpoint may not be writable either
                checkpoint.finish_run(self.run_id, RunState.FAILED.value, checkpoint.counts())
            raise
        except OutsideWindowError:  # --no-wait: stopped when the window closed
            self._finish(checkpoint, RunState.INTERRUPTED)
            raise
        except BaseException:
            # the archive went away or refused us: say so in the checkpoint, not "running"
            checkpoint.finish_run(self.run_id, RunState.ABORTED.value, checkpoint.counts())
            raise
        finally:
            trolley.close()
        return self._finish(checkpoint, self._outcome(checkpoint, failed_on_disk))

    def _outcome(self, checkpoint: Checkpoint, failed_on_disk: int) -> RunState:
        """complete only when every unit holds what the archive said and every row matched."""
        if failed_on_disk or checkpoint.items([FAILED, PENDING]) or rejections.recorded(checkpoint):
            return RunState.FAILED
        if checkpoint.items([INCOMPLETE]) or refused_unmatched(
            checkpoint, allowed_unmatched(self.manifest.queries)
        ):
            return RunState.INCOMPLETE
        return RunState.COMPLETE

    def _check_layout(self, checkpoint: Checkpoint) -> None:
        """Files stored under another layout are never silently left where they are:
        `run --refresh` moves them (atomically, resumably); without it the run refuses."""
        layout = self.manifest.storage.layout
        if not relayout.needs_relayout(checkpoint, self.storage, layout):
            checkpoint.set_meta("layout", layout)
            return
        if isinstance(self.storage, ObjectStorageDir):  # issue 19: objects are not renamed
            raise LayoutChangedError(
                f"storage.layout changed since objects were stored under {self.storage.store.url}"
                "; object storage cannot be re-laid out in place: use another prefix"
            )
        if not self.options.refresh:
            raise LayoutChangedError(
                f"storage.layout changed since files were stored in {self.root} (or a move "
                "to a new layout was interrupted); run with --refresh to move them to the "
                "new layout, or use another storage root"
            )
        with self.step("relayout", layout=layout) as outcome:

            def on_move(old: str, new: str) -> None:
                self.log.logger.debug("storage.moved", old=old, new=new)

            outcome["moved"] = relayout.relayout(checkpoint, self.storage, on_move)
        checkpoint.set_meta("layout", layout)
        self.log.logger.info("storage.relayout", layout=layout, moved=outcome["moved"])

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

    def _resolve_from_lock(
        self, trolley: Trolley, checkpoint: Checkpoint, lock: lockfile.Lock, wanted: str
    ) -> None:
        """Pull exactly what the lock lists; search only to report how the archive drifted."""
        clear = getattr(trolley.searcher, "clear", None)
        if callable(clear):
            clear()  # compare with the archive as it is now, not with cached answers
        with self.step(
            "search", query_sets=len(self.manifest.queries), lock=str(self.lock_path)
        ) as outcome:

            def on_query(query_set: str, query: Any, count: int) -> None:
                self.log.logger.info(
                    "search.query", query_set=query_set, filters=dict(query.filters), studies=count
                )

            searched = resolve.search_cohort(trolley, self.manifest, on_query)
            found = searched.found
            crash_point("after-search")
            outcome["studies"] = len(found)
        self._log_cohort(searched.cohort)
        current: dict[str, set[str]] = {}
        for item in found:
            current.setdefault(item.query_set, set()).add(item.study.uid)
        drift = lockfile.diff(lock, current)
        if drift.changed:
            self.log.logger.warning("lock.drift", lock=str(self.lock_path), **drift.to_json())
        else:
            self.log.logger.info("lock.matches", lock=str(self.lock_path), studies=len(found))
        checkpoint.add_run_provenance(self.run_id, lock_drift=drift.to_json())
        by_uid = {item.study.uid: item for item in found}
        rows = []
        for study_uid, query_set in sorted(lock.study_owners().items()):
            seen = by_uid.get(study_uid)
            row = resolve.study_row(seen) if seen else StudyRow(study_uid, query_set)
            rows.append(StudyRow(study_uid, query_set, *dataclasses.astuple(row)[2:]))
        references = lock.references()
        expectations = self._locked_expectations(trolley, lock, by_uid)
        saved = checkpoint.save_resolution(wanted, rows, references, expectations)
        checkpoint.set_meta("cohort", cohort_json(searched.cohort))
        crash_point("after-resolution")
        self.log.logger.info("checkpoint.resolved", items=saved, from_lock=str(self.lock_path))

    def _locked_expectations(
        self, trolley: Trolley, lock: lockfile.Lock, searched: dict[str, Found]
    ) -> dict[Any, Any]:
        """What each locked unit holds: as the lock recorded it, else as the archive says."""
        strict = self.manifest.run.completeness == "strict"
        expectations = lock.expectations()
        for ref in lock.references():
            if ref in expectations:
                continue
            seen = searched.get(ref.study_uid)
            study = seen.study if seen is not None else Study(ref.study_uid)
            expectations[ref] = resolve.expectation_of(trolley, study, ref, strict=strict)
        return expectations

    def _rewrite_lock(self, checkpoint: Checkpoint, planned: Planned) -> str:
        """`run --refresh` rewrites an existing lock; returns its hash ("" for no lock)."""
        if not (self.options.refresh and self.lock_path.exists()):
            return ""
        fresh = lockfile.Lock.from_resolution(
            self.manifest.name,
            resolve.resolution_hash(self.manifest),
            [(f.query_set, f.study.uid) for f in planned.kept],
            planned.references,
            planned.expectations,
        )
        fresh.resolved_dates = resolved_ranges(self.manifest)  # what `{last: 7d}` meant today
        changed = lockfile.write_lock(self.lock_path, fresh)
        sha = lockfile.lock_hash(self.lock_path)
        self.log.logger.info(
            "lock.written" if changed else "lock.unchanged", lock=str(self.lock_path), sha256=sha
        )
        checkpoint.add_run_provenance(
            self.run_id, lock_path=str(self.lock_path.absolute()), lock_sha256=sha
        )
        return sha

    def _remove_stale_temp_files(self) -> None:
        """Temp files of a killed run: incomplete by definition, and this run holds the lock."""
        removed = 0
        for stale in self.storage.tmp_dir.glob("*.part") if self.storage.tmp_dir.exists() else []:
            stale.unlink(missing_ok=True)
            removed += 1
        # issue 13: and those of an atomic write (reports, checksum files) killed half-way
        removed += remove_stale_temp_files(self.root, state_dir(self.root) / "reports")
        if removed:
            self.log.logger.info("storage.temp_removed", files=removed)

    # --- download ----------------------------------------------------------------------------

    def _download(self, trolley: Trolley, checkpoint: Checkpoint) -> None:
        todo = checkpoint.items(TODO_STATES)
        with self.step("download", items=len(todo), workers=self.workers) as outcome:
            progress = Progress(
                len(todo),
                enabled=self.options.progress and not self.options.quiet,
                lines=self.options.progress_lines and not self.options.quiet,
            )
            self.log.show_status_in(progress)  # retries and waits: the display's status line
            committer = Committer(
                self.storage, checkpoint, progress, source=self.source, run_id=self.run_id
            )

            def finished(item: Item, error: BaseException | None) -> None:
                if error is not None:  # _fetch_item records failures; this is a bug
                    raise error
                progress.item_finished()

            def interrupted(running: int) -> None:
                abort_transfers()  # reads blocked on a stalled server return now (issue 13)
                self.log.logger.warning("run.interrupted", waiting_for=running)

            if self.executor == "dask" and todo:  # issue 19: units run on a Dask cluster
                from trolley_etl.runner.executors.dask_executor import DaskExecutor

                self._dask = DaskExecutor(self.scheduler, self.workers, log=self.log.logger)
            with committer, contextlib.ExitStack() as cluster:
                if self._dask is not None:
                    cluster.callback(self._close_dask)
                try:
                    execute(
                        todo,
                        lambda item: self._fetch_item(trolley, checkpoint, item, committer),
                        workers=self.workers,
                        on_done=finished,
                        stop=self.stop,
                        on_interrupt=interrupted,
                        name="item",
                        before_each=self.gate.hold if self.gate is not None else None,
                    )
                except KeyboardInterrupt:
                    progress.close()
                    self.log.show_status_in(None)
                    raise
            progress.close()
            for event, fields in getattr(trolley.downloader, "drain_warnings", list)():
                self.log.logger.warning(event, **fields)  # e.g. values Part 10 cannot hold
            self.log.show_status_in(None)
            outcome.update(instances=progress.instances, bytes=progress.bytes)

    def _fetch_item(
        self, trolley: Trolley, checkpoint: Checkpoint, item: Item, committer: Committer
    ) -> None:
        """Fetch one unit with its retries; it ends done, incomplete or failed (or stopped)."""
        uids = {"study_uid": item.reference.study_uid, **_deeper_uids(item.reference)}
        item = self._with_expectation(trolley, checkpoint, item)
        for attempt in range(1, self.attempts_per_run + 1):
            if self.stop.is_set():
                return
            sink = _CheckpointSink(self, committer, item.item_id)
            try:
                self._attempt(trolley, checkpoint, item, sink, attempt, uids)
                return
            except _Stopped:
                sink.wait_quietly()
                return
            except IncompleteUnitError as short:
                if self._after_shortfall(trolley, checkpoint, item, short, attempt, uids):
                    return
            except Exception as error:
                sink.wait_quietly()
                if self._after_error(checkpoint, item, error, attempt, uids):
                    return

    def _attempt(
        self,
        trolley: Trolley,
        checkpoint: Checkpoint,
        item: Item,
        sink: _CheckpointSink,
        attempt: int,
        uids: dict[str, str],
    ) -> None:
        """One try: fetch the unit as planned, wait for its files, check it is complete."""
        started = time.monotonic()
        # the unit as planned: batches (RAD-69) from their stored instance lists; each
        # object is checked against the unit it was fetched for (issue 13)
        units: list[Any] = [item.reference]
        if self._dask is not None:  # issue 19: fetched on a worker, recorded here
            count = self._fetch_on_cluster(checkpoint, item, sink)
        else:
            units = _units(trolley, item, checkpoint)
            count = sum(
                trolley.downloader.fetch(
                    unit,
                    CheckedSink(sink, unit, max_object_bytes=self.max_object_bytes, root=self.root),
                )
                for unit in units
            )
        if count == 0 and item.expected.count != 0 and units:
            raise TrolleyError(f"the archive sent no instances for {item.reference}")
        sink.wait()  # every file of the item is recorded before it is marked done
        stored, extra = self._check_complete(checkpoint, item)
        crash_point("before-item-done")
        checkpoint.mark_done(item.item_id, stored, extra)
        self.log.logger.info(
            "item.done",
            **uids,
            instances=count,
            bytes=sink.bytes,
            attempt=attempt,
            expected_instances=item.expected.count,
            stored_instances=stored,
            duration_s=round(time.monotonic() - started, 3),
        )

    def _after_shortfall(
        self,
        trolley: Trolley,
        checkpoint: Checkpoint,
        item: Item,
        short: IncompleteUnitError,
        attempt: int,
        uids: dict[str, str],
    ) -> bool:
        """Log a shortfall; after the last try mark the unit incomplete. True: stop trying."""
        retry = attempt < self.attempts_per_run
        missing = short.missing
        if not missing and not retry:  # only a count was known: ask which ones
            missing = self._name_missing(trolley, checkpoint, item)
        self.log.logger.warning(
            "item.retry" if retry else "item.incomplete",
            **uids,
            attempt=attempt,
            expected_instances=short.expected,
            stored_instances=short.stored,
            missing_instances=short.expected - short.stored,
            missing_uids=missing[:50],
        )
        if not retry:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            checkpoint.mark_incomplete(
                item.item_id,
                short.stored,
                missing,
                f"incomplete: expected {short.expected} instances, stored "
                f"{short.stored}" + (f"; missing {shown}" if missing else ""),
            )
            return True
        return self.stop.wait(backoff_delay(attempt))

    def _after_error(
        self,
        checkpoint: Checkpoint,
        item: Item,
        error: Exception,
        attempt: int,
        uids: dict[str, str],
    ) -> bool:
        """Log a failed try; a permanent error or the last try fails the unit, a full disk
        stops the run (issue 13). True: stop trying."""
        full = disk_full_error(error, self.root)
        if full is not None:
            self.stop.set()
            raise full from None
        retry = is_retryable(error) and attempt < self.attempts_per_run
        self.log.logger.warning(
            "item.retry" if retry else "item.failed",
            **uids,
            attempt=attempt,
            error_type=type(error).__name__,
            error=str(error),
        )
        if not retry:
            checkpoint.mark_failed(item.item_id, f"{type(error).__name__}: {error}")
            return True
        return self.stop.wait(backoff_delay(attempt, error))

    def _fetch_on_cluster(self, checkpoint: Checkpoint, item: Item, sink: _CheckpointSink) -> int:
        """Run the unit as a Dask task; record the files it put in place (issue 19).

        The worker's records are written by this process only, in one transaction, before
        the caller checks completeness and marks the unit done.
        """
        from trolley_etl.runner.executors.dask_executor import UnitSpec, rebuild_error

        download = self.manifest.source.effective_download
        spec = UnitSpec(
            manifest=self.manifest,
            item=item,
            root=str(self.root),
            file_mode=self.storage.file_mode,
            max_object_bytes=self.max_object_bytes,
            lease_name=f"trolley-etl:{self.source}",
            max_leases=getattr(download, "max_connections", None) or DEFAULT_MAX_CONNECTIONS,
        )
        result = self._dask.run_unit(spec, self.stop)
        if result is None:
            raise _Stopped()
        crash_point("after-rename")  # the unit's objects in place, not yet recorded
        if result.stored:  # in place even when the unit failed later: known, not fetched again
            checkpoint.record_files_of_items(
                [(item.item_id, result.stored)], self.source, self.run_id
            )
            sink.files.bytes += result.bytes
            for stored in result.stored:
                sink.committer.progress.instance_stored(stored.size)
        if result.error is not None:
            raise rebuild_error(result.error)
        return int(result.count)

    def _close_dask(self) -> None:
        if self._dask is not None:
            self._dask.close()
            self._dask = None

    def _with_expectation(self, trolley: Trolley, checkpoint: Checkpoint, item: Item) -> Item:
        """A unit planned without an expectation (by an older trolley-etl) gets one now, from
        the archive, unless `run.completeness` is off."""
        if item.expected.count is not None or self.manifest.run.completeness != "strict":
            return item
        try:
            found = resolve.expectation_of(
                trolley, Study(item.reference.study_uid), item.reference, strict=True
            )
        except Exception as error:  # the fetch itself will meet the same archive
            self.log.logger.warning(
                "item.expectation_unknown", study_uid=item.reference.study_uid, error=str(error)
            )
            return item
        checkpoint.set_expectation(item.item_id, found)
        return dataclasses.replace(item, expected=found)

    def _check_complete(self, checkpoint: Checkpoint, item: Item) -> tuple[int, int]:
        """(stored, extra) when the unit holds at least what the archive said it holds.

        Raises IncompleteUnitError on a shortfall; more than expected is archive drift
        (new instances since the search): stored, logged and counted.
        """
        stored = checkpoint.stored_uids(item.item_id)
        if self.deid is not None:  # held back by the burned-in gate: received, not exported
            deeper = _deeper_uids(item.reference)
            held = quarantined_in(
                checkpoint.path, item.reference.study_uid, deeper.get("series_uid", "")
            )
            if "instance_uid" in deeper:
                held &= {deeper["instance_uid"]}
            stored = stored | held
        expected = item.expected
        if expected.uids is not None:
            wanted = set(expected.uids)
            missing = sorted(wanted - stored)
            extra = len(stored - wanted)
            if missing:
                raise IncompleteUnitError(len(wanted), len(wanted) - len(missing), missing)
        elif expected.count is not None:
            if len(stored) < expected.count:
                raise IncompleteUnitError(expected.count, len(stored), [])
            extra = len(stored) - expected.count
        else:
            return len(stored), 0
        if extra:
            ref = item.reference
            self.log.logger.warning(
                "archive.drift",
                study_uid=ref.study_uid,
                **_deeper_uids(ref),
                expected_instances=expected.count,
                stored_instances=len(stored),
                extra_instances=extra,
            )
        return len(stored), extra

    def _name_missing(self, trolley: Trolley, checkpoint: Checkpoint, item: Item) -> list[str]:
        """The unit's instances the searcher lists that are not stored ([] if unknown)."""
        try:
            listed = resolve.list_instances(trolley, item.reference)
        except Exception as error:  # naming is a courtesy; the shortfall stands regardless
            self.log.logger.warning("item.missing_unknown", error=str(error))
            return []
        return sorted(set(listed) - checkpoint.stored_uids(item.item_id))

    # --- verify and report -----------------------------------------------------------------

    def _verify(self, checkpoint: Checkpoint) -> int:
        """Every recorded file is on disk with its recorded size.

        Content needs no second look here: each file was hashed as it streamed and its header
        read before it was renamed into place. `trolley-etl verify` re-hashes everything.
        """
        problems = 0
        with self.step("verify") as outcome:
            checked = 0
            listed = (  # issue 19: one listing of the bucket instead of a stat per file
                self.storage.stored_sizes() if isinstance(self.storage, ObjectStorageDir) else None
            )
            root = str(self.root)  # a stat per file of a finished rerun: no Path objects
            for record in checkpoint.files():
                checked += 1
                try:
                    size = (
                        os.stat(os.path.join(root, record.path)).st_size
                        if listed is None
                        else listed.get(record.path, -1)
                    )
                except FileNotFoundError:
                    size = -1
                if size != record.size:
                    problems += 1
                    reason = "missing" if size < 0 else f"size {size} != recorded {record.size}"
                    self.log.logger.error(
                        "verify.bad_file",
                        path=record.path,
                        reason=reason,
                        sop_instance_uid=record.sop_instance_uid,
                    )
                    checkpoint.reopen_item(
                        record.item_id, [record.sop_instance_uid], f"file {reason}: {record.path}"
                    )
            outcome.update(files=checked, problems=problems)
        return problems

    def _finish(self, checkpoint: Checkpoint, state: RunState) -> RunResult:
        status = state.value
        counts = checkpoint.counts()
        failed = [
            {
                "study_uid": i.reference.study_uid,
                **_deeper_uids(i.reference),
                "attempts": i.attempts,
                "error": i.last_error,
            }
            for i in checkpoint.items([FAILED])
        ]
        incomplete = [
            {
                "study_uid": i.reference.study_uid,
                **_deeper_uids(i.reference),
                "expected_instances": i.expected.count,
                "stored_instances": i.stored_instances,
                "missing_uids": list(i.missing_uids),
            }
            for i in checkpoint.items([INCOMPLETE])
        ]
        unmatched = refused_unmatched(checkpoint, allowed_unmatched(self.manifest.queries))
        self.log.bind(step="report")
        checkpoint.finish_run(self.run_id, status, counts)
        if self.deid is not None:
            self.deid.close()  # its counts and settings go into the report
        # the audit report of the whole root after this run, and the checksums beside the data
        listed = (  # issue 19: objects are found in a listing, not with a stat
            self.storage.stored_sizes() if isinstance(self.storage, ObjectStorageDir) else None
        )
        changes = RunChanges(self.run_id)  # gathered row by row: no list of every file
        audit = report.build_report(
            checkpoint,
            self.manifest,
            self.manifest_path,
            self.root,
            sizes=listed,
            all_instances=False,
            on_row=changes.add,
        )
        audit.update(
            run_id=self.run_id,
            status=status,
            counts=counts,
            failed=failed,
            incomplete=incomplete,
            unmatched=unmatched,
        )
        small = run_report(audit, self.run_id, changes)  # `report` lists every file
        report_path = report.save_report(
            self.root, report.report_json(small), f"{self.run_id}.json"
        )
        bag = report.write_bag_manifests(self.root, checkpoint.file_checksums(), self.manifest.name)
        if isinstance(self.storage, ObjectStorageDir):  # issue 19: the checksums beside the data
            copy_tag_files(self.root, self.storage.store, report.ROOT_TAG_FILES)
        self.log.logger.info(
            "report.written",
            report=str(report_path),
            bag_manifest=str(self.root / report.BAG_MANIFEST),
            bagit=bag,
            **audit["summary"]["by_status"],
        )
        self.log.logger.info("run.end", status=status, **counts, report=str(report_path))
        return RunResult(self.run_id, status, counts, failed, report_path, incomplete, unmatched)


def _units(trolley: Trolley, item: Item, checkpoint: Checkpoint | None = None) -> list[Any]:
    """What to ask the downloader for: a series unit of an instance-level downloader
    (RAD-69 and WADO-URI batches) is executed from the instance list stored with the plan,
    without searching again, and without the instances it already stored (a retry or a
    resumed run asks only for the rest; none left: no request at all); everything else is
    the unit's own reference, planned by the Trolley."""
    ref = item.reference
    uids = item.expected.uids
    if (
        uids
        and isinstance(ref, SeriesReference)
        and trolley.downloader.retrieval_level is QueryLevel.INSTANCE
    ):
        have = checkpoint.stored_uids(item.item_id) if checkpoint is not None else set()
        listed = [
            InstanceReference(ref.study_uid, ref.series_uid, uid) for uid in uids if uid not in have
        ]
        return trolley.downloader.plan(listed) if listed else []
    return trolley.plan([ref])


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

    accepts_views = True  # passed on to the StagedFile, which takes them

    def write(self, chunk: bytes) -> None:
        if self._sink.runner.stop.is_set():
            raise _Stopped()
        self._staged.write(chunk)

    def content_digest(self) -> bytes:
        return self._staged.content_digest()

    def header_uids(self) -> dict[str, object] | None:
        return self._staged.header_uids()

    def header_prefix(self) -> bytes:
        return self._staged.header_prefix()

    def commit(self) -> None:
        stored = self._staged.finish(sync=False)  # synced by the committer, with its batch
        path, deid = self._staged.path, self._sink.runner.deid
        if deid is not None:  # the received file becomes a de-identified one, or is held back
            placed = deid.process(path, stored, self._sink.runner.storage)
            if placed is None:
                return
            path, stored = placed
        self._sink.committer.submit(self._sink.files, path, stored)

    def abort(self) -> None:
        self._staged.abort()


class _CheckpointSink:
    """Stores through the runner's StorageDir; the committer puts the files in place, records
    them in the checkpoint and makes them durable by batch (see `runner.committer`)."""

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
        self.committer.wait_for(self.files)

    def wait_quietly(self) -> None:
        """After a failure: let the files already received be recorded; if that fails too,
        they are merely unknown to the checkpoint, which is safe (the item is fetched
        again)."""
        with contextlib.suppress(Exception):
            self.committer.wait_for(self.files)
