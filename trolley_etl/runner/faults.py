"""Crash points for the crash-safety tests.

`TROLLEY_ETL_CRASH_AT=name:N` makes the process kill itself with SIGKILL the N-th time it
reaches the crash point `name`, exactly as a power cut or the OOM killer would. Without the
variable each call is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import threading

_VARIABLE = "TROLLEY_ETL_CRASH_AT"
_lock = threading.Lock()
_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get(_VARIABLE)
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count or 1)


_TARGET = _target()


def crash_point(name: str) -> None:
    if _TARGET is None or _TARGET[0] != name:
        return
    with _lock:
        _hits[name] = _hits.get(name, 0) + 1
        if _hits[name] >= _TARGET[1]:
            os.kill(os.getpid(), signal.SIGKILL)
