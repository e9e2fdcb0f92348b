"""Waiting out an archive that is down, instead of failing every item (issue 13).

`OutageGate` is shared by the HTTP clients of one run. A PACS restart makes every request
fail at once; without the gate each item would burn its few quick retries and thousands of
items would end `failed`. When a request fails with a connection error or a 5xx, after the
archive has answered at least once in this run (a wrong URL still fails fast), the gate
probes the archive's base URL: if that answers (below 500), the failure is this request's
own (one study answering 503) and the usual retries handle it. If the probe fails too, the
archive is down: the request waits with backoff and is sent again, each time a new probe,
until the archive answers or `run.outage_wait` seconds have passed since the outage began.
"""

from __future__ import annotations

import random
import threading
import time
import weakref
from collections.abc import Callable

from trolley_etl.core.errors import ConnectionFailedError

#: Longest pause between two probes during an outage; Retry-After is honoured up to MAX_WAIT.
PROBE_CAP = 30.0
MAX_WAIT = 120.0


def is_outage_error(error: BaseException | None = None, status: int | None = None) -> bool:
    """Connection failures and 5xx answers: what a down archive gives."""
    if isinstance(error, ConnectionFailedError):
        return True
    code = status if status is not None else getattr(error, "status", None)
    return isinstance(code, int) and 500 <= code <= 599


_GATES: weakref.WeakSet[OutageGate] = weakref.WeakSet()


class OutageGate:
    """Decides whether a failed request waits for the archive to come back (see module)."""

    def __init__(self, wait: float, stop: threading.Event | None = None) -> None:
        self.wait = wait
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()
        self._answered = False  # the archive answered at least once in this run
        self._outage_since: float | None = None
        self.outages = 0  # outages seen (for logs and tests)
        _GATES.add(self)

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    def answered(self) -> None:
        with self._lock:
            self._answered = True
            self._outage_since = None

    def should_retry(
        self,
        probe: Callable[[], bool],
        attempt: int,
        *,
        error: BaseException | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> bool:
        """After a failed request: True (after waiting) to send it again; `probe()` says
        whether the archive answers at all."""
        if self.wait <= 0 or not is_outage_error(error, status) or self.stop.is_set():
            return False
        with self._lock:
            if not self._answered:
                return False
            declared = self._outage_since is not None
        if not declared:
            if probe():
                return False  # the archive is up: this request's own failure
            with self._lock:
                if self._outage_since is None:
                    self._outage_since = time.monotonic()
                    self.outages += 1
        with self._lock:
            since = self._outage_since
        if since is None:
            return True  # it came back meanwhile
        remaining = since + self.wait - time.monotonic()
        if remaining <= 0:
            return False
        cap = min(PROBE_CAP, 2.0 ** min(attempt, 10))
        delay = retry_after if retry_after is not None else random.uniform(cap / 2, cap)
        return not self.stop.wait(min(delay, MAX_WAIT, remaining))


def stop_waiting() -> None:
    """Every gate stops waiting at once (the run is being interrupted)."""
    for gate in list(_GATES):
        gate.stop.set()
