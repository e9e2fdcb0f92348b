"""`run.executor: dask`: the units of a run executed on Dask distributed workers.

The driver (the `trolley-etl run` process) keeps everything with state: the checkpoint, the
retries, the completeness check, the report. Each unit becomes one Dask task, `fetch_unit`,
which holds no state: it builds the manifest's backends, fetches the unit, streams each
instance to its final place (a PUT to the bucket, or a rename under a root every worker
shares), hashing it and reading its header on the way, and returns the file records. The
driver records them and marks the unit done; it stays the only writer of the checkpoint.

A worker killed mid-task is restarted by its nanny and Dask runs the task again; objects it
had already sent are accepted as identical (If-None-Match, same SHA-256) or renamed over
with the same bytes. The download backend's `max_connections` holds across the cluster:
each task takes a lease of a `distributed.Semaphore` named after the run's source.

C-MOVE is refused: its destination is one listener whose AE title the archive knows, which
a cluster of workers on other hosts cannot be. De-identification is refused too (its keys
and pseudonyms live in the driver's checkpoint); use the threads executor for both.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trolley_etl.core.errors import (
    BackendError,
    ConnectionFailedError,
    ExecutorSettingsError,
    StorageError,
    TrolleyError,
)
from trolley_etl.core.storage import StagedFile, StorageDir, StoredInstance

if TYPE_CHECKING:
    from trolley_etl.manifest import Manifest
    from trolley_etl.runner.checkpoint import Item

#: Seconds a driver thread waits on a task between two looks at the stop flag.
POLL_SECONDS = 0.5
#: Seconds to connect to the scheduler before the run fails (exit 3).
CONNECT_TIMEOUT = 15
#: Seconds a task waits for a connection lease before it gives up (and is retried).
LEASE_TIMEOUT = 3600.0


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise ExecutorSettingsError(
            "run.executor dask needs Dask distributed: pip install 'trolley-etl[dask]'"
        ) from None
    return distributed


def check_manifest(manifest: Manifest) -> None:
    """Refuse, before anything runs, what a cluster of stateless workers cannot do."""
    _distributed()  # installed?
    download = manifest.source.effective_download
    if getattr(download, "backend", "") == "c-move":
        raise ExecutorSettingsError(
            "run.executor dask cannot use c-move: its move destination is one listener the "
            "archive knows by AE title, which workers on other hosts are not; use c-get, "
            "wado-rs or wado-uri, or the threads executor"
        )
    if manifest.deid is not None:
        raise ExecutorSettingsError(
            "run.executor dask does not de-identify (its keys and pseudonyms live in the "
            "driver's checkpoint); use the threads executor for a deid manifest"
        )


@dataclass(frozen=True)
class UnitSpec:
    """Everything a worker needs for one unit (pickled to it)."""

    manifest: Manifest
    item: Item
    root: str  # the local root every worker shares; unused for an object-storage root
    file_mode: int | None
    max_object_bytes: int
    lease_name: str
    max_leases: int


@dataclass
class UnitResult:
    stored: list[StoredInstance] = field(default_factory=list)
    count: int = 0
    bytes: int = 0
    #: (module, class name, message, status, url, retry_after) of a failure, else None
    error: tuple[str, str, str, int | None, str | None, float | None] | None = None


class _InstallingSink:
    """Each instance into a temp file, then straight to its final place (no committer)."""

    def __init__(self, storage: StorageDir) -> None:
        self.storage = storage
        self.stored: list[StoredInstance] = []
        self.bytes = 0

    def open_instance(self) -> _InstallingWriter:
        return _InstallingWriter(self)


class _InstallingWriter:
    def __init__(self, sink: _InstallingSink) -> None:
        self._sink = sink
        self._staged: StagedFile = sink.storage.open_instance()

    def write(self, chunk: bytes) -> None:
        self._staged.write(chunk)

    def commit(self) -> None:
        remote = self._sink.storage.is_remote
        stored = self._staged.finish(sync=not remote)  # a rename needs the bytes durable
        try:
            self._sink.storage.install(self._staged.path, stored)
        except BaseException:
            self._staged.abort()
            raise
        self._sink.stored.append(stored)
        self._sink.bytes += stored.size

    def abort(self) -> None:
        self._staged.abort()


def _worker_storage(spec: UnitSpec, scratch: Path) -> StorageDir:
    manifest = spec.manifest
    if manifest.object_root is not None:
        from trolley_etl.core.objectstore import object_storage

        storage: StorageDir = object_storage(manifest, scratch)  # temp files on the worker
    else:
        storage = StorageDir(
            spec.root, manifest.storage.layout, file_format=manifest.source.file_format
        )
    storage.file_mode = spec.file_mode
    return storage


#: Per worker process: the backends and storage of each manifest, built once and reused by
#: every task of that run (connections, the S3 client), never any state of the run itself.
_TOOLS: dict[tuple[str, str], tuple[Any, StorageDir]] = {}
_TOOLS_LOCK = threading.Lock()


def _tools(spec: UnitSpec) -> tuple[Any, StorageDir]:
    """(Trolley, StorageDir) of the spec's manifest in this worker process."""
    from trolley_etl.core.trolley import Trolley
    from trolley_etl.runner.backends import build_backends

    key = (spec.manifest.model_dump_json(), spec.root)
    with _TOOLS_LOCK:
        if key not in _TOOLS:
            scratch = Path(tempfile.mkdtemp(prefix="trolley-worker-"))  # 0700
            atexit.register(shutil.rmtree, scratch, True)
            storage = _worker_storage(spec, scratch)
            searcher, downloader = build_backends(spec.manifest, threading.Event())
            trolley = Trolley(searcher=searcher, downloader=downloader, storage=storage, workers=1)
            _TOOLS[key] = (trolley, storage)
        return _TOOLS[key]


def fetch_unit(spec: UnitSpec) -> UnitResult:
    """The Dask task: fetch one unit, put each instance in place, return the records."""
    from trolley_etl.core.arrival import CheckedSink
    from trolley_etl.runner.run import _units

    result = UnitResult()
    try:
        trolley, storage = _tools(spec)
        sink = _InstallingSink(storage)
        with _lease(spec):
            result.count = sum(
                trolley.downloader.fetch(
                    unit,
                    CheckedSink(
                        sink,
                        unit,
                        max_object_bytes=spec.max_object_bytes,
                        root=Path(spec.root),
                    ),
                )
                for unit in _units(trolley, spec.item)
            )
        result.stored, result.bytes = sink.stored, sink.bytes
    except Exception as error:  # sent back as plain values: any exception pickles that way
        result.error = (
            type(error).__module__,
            type(error).__qualname__,
            str(error),
            getattr(error, "status", None),
            getattr(error, "url", None),
            getattr(error, "retry_after", None),
        )
        result.stored, result.bytes = (sink.stored, sink.bytes) if "sink" in locals() else ([], 0)
    return result


@contextlib.contextmanager
def _lease(spec: UnitSpec) -> Iterator[None]:
    """One of the backend's `max_connections` across the whole cluster."""
    distributed = _distributed()
    semaphore = distributed.Semaphore(max_leases=spec.max_leases, name=spec.lease_name)
    if not semaphore.acquire(timeout=LEASE_TIMEOUT):
        raise BackendError("no connection lease within the wait (the cluster is saturated)")
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            semaphore.release()


def rebuild_error(error: tuple[str, str, str, int | None, str | None, float | None]) -> Exception:
    """The worker's exception again, as the driver's retry rules expect it."""
    module, name, message, status, url, retry_after = error
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, BackendError):
        return cls(message, url=url, status=status, retry_after=retry_after)
    if isinstance(cls, type) and issubclass(cls, (StorageError, OSError, TimeoutError)):
        with contextlib.suppress(Exception):
            return cls(message)
    if isinstance(cls, type) and issubclass(cls, TrolleyError):
        with contextlib.suppress(Exception):
            return cls(message)
    return TrolleyError(f"{name}: {message}")


class DaskExecutor:
    """The cluster connection of one run: `submit` a unit, wait for its records."""

    def __init__(self, scheduler: str | None, workers: int, *, log: Any = None) -> None:
        distributed = _distributed()
        self.cluster = None
        try:
            if scheduler:
                self.client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT)
            else:
                self.cluster = distributed.LocalCluster(
                    n_workers=workers,
                    processes=True,
                    threads_per_worker=1,
                    host="127.0.0.1",
                    dashboard_address=None,
                    silence_logs=40,
                )
                self.client = distributed.Client(self.cluster, timeout=CONNECT_TIMEOUT)
        except Exception as error:  # refused, timed out, no ports: one line, exit 3
            if self.cluster is not None:
                with contextlib.suppress(Exception):
                    self.cluster.close()
            where = scheduler or "a local cluster"
            raise ConnectionFailedError(
                f"cannot reach the Dask scheduler ({where}): {type(error).__name__}: {error}"
            ) from None
        if log is not None:
            log.info(
                "executor.dask",
                scheduler=self.client.scheduler.address,
                workers=len(self.client.scheduler_info().get("workers", {})),
            )

    def run_unit(self, spec: UnitSpec, stop: threading.Event) -> UnitResult | None:
        """The unit's result, or None when the run stopped first (the task is cancelled)."""
        key = f"unit-{spec.item.item_id}-{os.urandom(4).hex()}"
        future = self.client.submit(fetch_unit, spec, pure=False, key=key)
        from distributed import TimeoutError as DaskTimeout

        while True:
            if stop.is_set():
                future.cancel()
                return None
            try:
                result: UnitResult = future.result(timeout=POLL_SECONDS)
                return result
            except (DaskTimeout, TimeoutError):
                continue
            except Exception as error:  # the cluster lost the task (KilledWorker, ...)
                raise ConnectionFailedError(f"dask: {type(error).__name__}: {error}") from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close(timeout=10)
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.close(timeout=10)
