"""The manifest's `run.limits` and `run.outage_wait` applied to a run's backends (issue 13).

Backends take their bounds as constructor arguments with safe defaults; a manifest can
tighten or widen them without each backend's construction knowing about the setting.
"""

from __future__ import annotations

import dataclasses
import threading

from trolley_etl.core.backend import Downloader, Searcher
from trolley_etl.core.outage import OutageGate
from trolley_etl.manifest import Manifest
from trolley_etl.runner.outage import RetryingSearcher


def harden(
    manifest: Manifest,
    searcher: Searcher,
    downloader: Downloader,
    stop: threading.Event | None = None,
) -> None:
    """Bound every HTTP backend and give them one outage gate (stopped by `stop`)."""
    apply_limits(manifest, searcher, downloader, gate=OutageGate(manifest.run.outage_wait, stop))


def retrying(searcher: Searcher, manifest: Manifest, stop: threading.Event) -> Searcher:
    """The searcher, wrapped so that searches retry like downloads (runner.outage)."""
    return RetryingSearcher(searcher, manifest.run.retries, stop)


def apply_limits(manifest: Manifest, *backends: object, gate: OutageGate | None = None) -> None:
    """Set the answer size, page count, request deadline and outage gate of HTTP backends."""
    limits = manifest.run.limits
    for backend in backends:
        http = getattr(backend, "http", None)
        if http is not None and hasattr(http, "deadline"):
            http.deadline = limits.request_deadline
            http.max_answer_bytes = limits.max_search_answer_mb << 20
            http.outage = gate
        if hasattr(backend, "max_pages"):
            backend.max_pages = limits.max_search_pages
        settings = getattr(backend, "settings", None)  # DIMSE backends
        if settings is None:
            continue
        from trolley_etl.backends.dimse import DimseSettings  # pynetdicom: only when used

        if isinstance(settings, DimseSettings):
            bounded = dataclasses.replace(settings, deadline=limits.request_deadline)
            setattr(backend, "settings", bounded)  # noqa: B010 - any backend with DIMSE settings
