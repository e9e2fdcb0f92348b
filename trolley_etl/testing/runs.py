"""Run a manifest against a fake archive, in process: the runner as the CLI drives it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trolley_etl.runner.run import RunResult
    from trolley_etl.testing.fakes import FakeArchive


def run_manifest(manifest: str | Path, archive: FakeArchive, **options: object) -> RunResult:
    """Execute `manifest` with `archive` as its searcher and downloader; return the result.

    Everything else is as `trolley-etl run` does it (checkpoint, resume, completeness,
    report under `storage.root`); `options` are RunOptions fields (`refresh=True`, ...).
    The log goes nowhere but the run's own log file.
    """
    from trolley_etl.manifest import load_manifest
    from trolley_etl.runner.logs import RunLog
    from trolley_etl.runner.run import Runner, RunOptions

    path = Path(manifest)
    log = RunLog(log_file=None, stderr_format="json", quiet=True)
    runner = Runner(
        load_manifest(path),
        path,
        log,
        RunOptions(progress=False, quiet=True, **options),  # type: ignore[arg-type]
        backends=archive.backends,
    )
    try:
        return runner.run()
    finally:
        log.close()
