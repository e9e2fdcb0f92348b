"""Stopping transfers in flight at once, whatever protocol carries them (issue 13).

A read blocked on a stalled server (HTTP) or an association waiting for the next C-STORE
(DIMSE) would keep SIGINT/SIGTERM waiting for a whole idle timeout. Each protocol module
registers how to cut its open transfers; the runner calls `abort_transfers` when it stops.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_lock = threading.Lock()
_hooks: list[Callable[[], int]] = []


def on_abort(hook: Callable[[], int]) -> None:
    """Register a function that cuts its protocol's open transfers (returns how many)."""
    with _lock:
        if hook not in _hooks:
            _hooks.append(hook)


def abort_transfers() -> int:
    """Cut every open transfer of every protocol now; returns how many were cut."""
    with _lock:
        hooks = list(_hooks)
    return sum(hook() for hook in hooks)
