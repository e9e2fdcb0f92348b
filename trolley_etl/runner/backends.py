"""Build the searcher and downloader a manifest names, with secrets read from the environment.

Each manifest backend entry builds its own backend (`searcher()` / `downloader()`) and
describes itself (`describe()`), so this module only adds what a run needs on top: the caps
logged and reported, the run's bounds and outage gate (`runner.bounds`). A new protocol is
one backend module plus its manifest model; nothing here changes.
"""

from __future__ import annotations

import threading
from typing import Any

from trolley_etl.backends.limits import BackendLimits
from trolley_etl.core.backend import Downloader, Searcher
from trolley_etl.manifest import Manifest
from trolley_etl.manifest.models import BackendCaps, DownloadConfig, SearchConfig
from trolley_etl.runner.bounds import harden


def build_backends(
    manifest: Manifest, stop: threading.Event | None = None, log: Any = None
) -> tuple[Searcher, Downloader]:
    """The searcher and the downloader the manifest names (one object for a local folder).

    `stop` cuts their transfers short when the run stops; `log` (a structlog logger) hears
    about each backend's caps, waits and split searches, through a logger bound to the
    backend's role.
    """
    search, download = manifest.source.search, manifest.source.effective_download
    searcher = search.searcher(manifest.base_dir, _limits(search, "search", log))
    if log is not None and hasattr(searcher, "on_split"):
        split_log = _for_role(log, "search")
        searcher.on_split = lambda name, **fields: split_log.info(name, **fields)
    if download.backend == "local" and isinstance(searcher, Downloader):
        return searcher, searcher
    downloader = download.downloader(_limits(download, "download", log))
    harden(manifest, searcher, downloader, stop)  # issue 13: bounds and the outage gate
    return searcher, downloader


def _limits(config: SearchConfig | DownloadConfig, role: str, log: Any) -> BackendLimits | None:
    """The entry's caps, with their waits logged; None for a local folder (no caps)."""
    if not isinstance(config, BackendCaps):
        return None
    limits = config.backend_limits()
    if log is not None:
        bound = _for_role(log, role)
        limits.on_event = lambda name, **fields: bound.info(name, **fields)
        bound.info("backend.limits", source=config.describe(), **limits.describe())
    return limits


def _for_role(log: Any, role: str) -> Any:
    """`log` bound to a backend's role."""
    return log.bind(role=role)


def describe_source(config: SearchConfig | DownloadConfig) -> str:
    """Where data comes from, for logs and reports: a URL without credentials, or an AE."""
    return config.describe()
