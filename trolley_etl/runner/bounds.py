"""The manifest's `run.limits` applied to the backends a run builds (issue 13).

Backends take their bounds as constructor arguments with safe defaults; a manifest can
tighten or widen them without each backend's construction knowing about the setting.
"""

from __future__ import annotations

from trolley_etl.manifest import Manifest


def apply_limits(manifest: Manifest, *backends: object) -> None:
    """Set the answer size, page count and request deadline of every HTTP backend."""
    limits = manifest.run.limits
    for backend in backends:
        http = getattr(backend, "http", None)
        if http is not None and hasattr(http, "deadline"):
            http.deadline = limits.request_deadline
            http.max_answer_bytes = limits.max_search_answer_mb << 20
        if hasattr(backend, "max_pages"):
            backend.max_pages = limits.max_search_pages
