"""When to try an item again, and how long to wait first.

Whether a failure is worth another attempt is the error's own `transient` property (see the
tree in `trolley_etl.core.errors`): connection errors, truncated answers and HTTP
408/425/429/5xx are; bad credentials, 404 and unusable data are not. Transient failures are
retried with exponential backoff and full jitter, or after the server's own `Retry-After`.
"""

from __future__ import annotations

import random

from trolley_etl.core.errors import TrolleyError

#: Never wait longer than this between two attempts, whatever Retry-After says.
MAX_DELAY = 120.0


def is_retryable(error: BaseException) -> bool:
    """Our errors say so themselves; of the others, only OS-level I/O and timeouts are."""
    if isinstance(error, TrolleyError):
        return error.transient
    return isinstance(error, (OSError, TimeoutError))


def backoff_delay(
    attempt: int, error: BaseException | None = None, *, base: float = 0.5, cap: float = 30.0
) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1)."""
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        return min(max(float(retry_after), 0.0), MAX_DELAY)
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))
