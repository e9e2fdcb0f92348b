"""Caps on what one backend asks of an archive, shared by every worker that uses it.

A research pull runs against the archive radiologists are reading from, so each backend can
be capped: at most `max_connections` open at once (HTTP connections or DICOM associations),
at most `requests_per_second` requests started (HTTP requests, or DIMSE ones: C-FIND, C-GET,
C-MOVE), at
most `megabytes_per_second` received (10^6 bytes; throttled as data arrives, so the archive
is slowed by TCP or by late C-STORE answers, never flooded). One BackendLimits object is
shared by all the threads of a backend, so the caps hold however many workers run.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from trolley_etl.core.errors import ConfigurationError

#: Connections a backend opens at most unless the manifest says otherwise.
DEFAULT_MAX_CONNECTIONS = 4
#: How often (seconds) the log hears that the caps slowed the run down.
REPORT_EVERY = 30.0


class RateLimiter:
    """At most `rate` units per second, spread evenly (no bursts beyond `burst` units).

    Each caller reserves its share of time under a lock and sleeps outside it, so waiting
    callers are served in order and the rate holds across threads.
    """

    def __init__(self, rate: float, *, burst: float = 0.0) -> None:
        if rate <= 0:
            raise ConfigurationError("rate must be positive")
        self.rate = rate
        self.burst_seconds = burst / rate
        self._next = 0.0  # the monotonic time from which the next unit is free
        self._lock = threading.Lock()

    def reserve(self, amount: float = 1.0) -> float:
        """Take `amount` units; return the seconds to wait before using them."""
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now - self.burst_seconds)
            self._next = start + amount / self.rate
            return max(0.0, start - now)

    def consume(self, amount: float) -> float:
        """Account for `amount` units already used; return the seconds to pause after them."""
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now - self.burst_seconds)
            self._next = start + amount / self.rate
            return max(0.0, self._next - now)


@dataclass
class BackendLimits:
    """The caps of one backend (None: no cap of that kind)."""

    max_connections: int | None = DEFAULT_MAX_CONNECTIONS
    requests_per_second: float | None = None
    megabytes_per_second: float | None = None
    #: Hears `(event, **fields)` about waits, for the run log.
    on_event: Callable[..., None] | None = None
    waited_s: float = 0.0
    _requests: RateLimiter | None = field(default=None, init=False, repr=False)
    _bytes: RateLimiter | None = field(default=None, init=False, repr=False)
    _slots: threading.BoundedSemaphore | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _reported_at: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_connections is not None:
            if self.max_connections < 1:
                raise ConfigurationError("max_connections must be at least 1")
            self._slots = threading.BoundedSemaphore(self.max_connections)
        if self.requests_per_second is not None:
            self._requests = RateLimiter(self.requests_per_second)
        if self.megabytes_per_second is not None:
            # a burst of 1/4 s of data: chunks arrive in pieces, the average is what counts
            rate = self.megabytes_per_second * 1e6
            self._bytes = RateLimiter(rate, burst=rate / 4)

    def describe(self) -> dict[str, Any]:
        """The caps as log fields."""
        return {
            "max_connections": self.max_connections,
            "requests_per_second": self.requests_per_second,
            "megabytes_per_second": self.megabytes_per_second,
        }

    def request(self) -> None:
        """Wait until one more request may start."""
        if self._requests is not None:
            self._pause(self._requests.reserve(1), "requests_per_second")

    def received(self, size: int) -> None:
        """Account for `size` bytes received; pause so the average stays under the cap."""
        if self._bytes is not None and size > 0:
            self._pause(self._bytes.consume(size), "megabytes_per_second")

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        """Hold one of `max_connections` slots (for DICOM associations)."""
        if self._slots is None:
            yield
            return
        started = time.monotonic()
        self._slots.acquire()
        self._note_wait(time.monotonic() - started, "max_connections")
        try:
            yield
        finally:
            self._slots.release()

    def try_connection(self) -> bool:
        """Take one of `max_connections` slots if one is free now (for an association kept
        open across retrievals, which holds it until `release_connection`)."""
        if self._slots is None:
            return True
        return self._slots.acquire(blocking=False)

    def release_connection(self) -> None:
        """Give back a slot taken with `try_connection`."""
        if self._slots is not None:
            self._slots.release()

    def _pause(self, seconds: float, cap: str) -> None:
        if seconds > 0:
            time.sleep(seconds)
            self._note_wait(seconds, cap)

    def _note_wait(self, seconds: float, cap: str) -> None:
        if seconds <= 0.001:
            return
        with self._lock:
            self.waited_s += seconds
            now = time.monotonic()
            report = self.on_event is not None and now - self._reported_at >= REPORT_EVERY
            if report:
                self._reported_at = now
            total = self.waited_s
        if report and self.on_event is not None:
            self.on_event("backend.throttled", cap=cap, waited_s=round(total, 1), **self.describe())
