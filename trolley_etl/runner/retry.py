"""When to try an item again, and how long to wait first.

Transient failures (connection errors, timeouts, truncated answers, HTTP 408/425/429/5xx,
DIMSE failures) are retried with exponential backoff and full jitter, or after the server's
own `Retry-After`. Permanent ones (bad credentials, 404, unusable data) are not.
"""

from __future__ import annotations

import random

from trolley_etl.core.errors import (
    AuthenticationError,
    BackendError,
    ConnectionFailedError,
    ObjectNotFoundError,
    ResponseFormatError,
)

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Never wait longer than this between two attempts, whatever Retry-After says.
MAX_DELAY = 120.0


def is_retryable(error: BaseException) -> bool:
    if isinstance(error, (AuthenticationError, ObjectNotFoundError)):
        return False
    if isinstance(error, (ConnectionFailedError, ResponseFormatError)):
        return True
    if isinstance(error, BackendError):
        return error.status is None or error.status in RETRYABLE_STATUS
    return isinstance(error, (OSError, TimeoutError))


def backoff_delay(
    attempt: int, error: BaseException | None = None, *, base: float = 0.5, cap: float = 30.0
) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1)."""
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        return min(max(float(retry_after), 0.0), MAX_DELAY)
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
