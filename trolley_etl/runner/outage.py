"""Searches that retry like downloads (issue 13).

`RetryingSearcher` gives every search (and every expansion search) the same retries as a
download item: exponential backoff, the server's Retry-After honoured. When the archive
stays unreachable it raises `ArchiveUnavailableError`, which the command line reports with
exit code 3 (a backend could not be reached), not as a usage error.
"""

from __future__ import annotations

import threading

from trolley_etl.core.backend import Searcher
from trolley_etl.core.errors import ArchiveUnavailableError, BackendError
from trolley_etl.core.model import Study
from trolley_etl.core.outage import is_outage_error
from trolley_etl.core.query import Query
from trolley_etl.runner.retry import backoff_delay, is_retryable


class RetryingSearcher(Searcher):
    """Retries each search on transient errors; see the module docstring."""

    def __init__(self, inner: Searcher, retries: int, stop: threading.Event | None = None):
        self.inner = inner
        self.attempts = retries + 1
        self.stop = stop or threading.Event()

    def search(self, query: Query) -> list[Study]:
        for attempt in range(1, self.attempts + 1):
            try:
                return self.inner.search(query)
            except BackendError as error:
                transient = is_outage_error(error) or error.status in (408, 425, 429)
                if not (transient and is_retryable(error)):
                    raise  # refused credentials, 404, a malformed answer: asking again won't help
                if attempt == self.attempts:
                    raise ArchiveUnavailableError(
                        f"the archive stayed unavailable through {attempt} attempt(s): {error}",
                        url=error.url,
                        status=error.status,
                    ) from None
                if self.stop.wait(backoff_delay(attempt, error)):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def __getattr__(self, name: str) -> object:  # clear(), hits, ... of the wrapped searcher
        return getattr(self.inner, name)

    def close(self) -> None:
        self.inner.close()
