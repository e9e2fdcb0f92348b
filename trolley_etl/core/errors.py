"""The project's error types.

Every failure a user can meet is one of these, so callers (the CLI, CI scripts) can map it to an
exit code and a one-line message instead of a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trolley_etl.core.model import QueryLevel


class TrolleyError(Exception):
    """Base class of every error trolley-etl raises on purpose."""


class QueryError(TrolleyError, ValueError):
    """A query is malformed: unknown keyword, bad date or time, wrong value type."""


class StorageError(TrolleyError):
    """A dataset could not be stored (unreadable DICOM, bad layout template, disk error)."""


class DiskFullError(StorageError):
    """The disk holding the storage root is full: not retried, the run stops (issue 13)."""


class NotFoundError(TrolleyError):
    """A search that had to match something matched nothing (or too much, see the message)."""


class MissingReferencesError(TrolleyError):
    """The object tree does not reach the level that is needed.

    Raised by `contained_references` and by downloaders that can only fetch series or
    instances. The Trolley catches it and asks its searcher for the missing levels.
    """

    def __init__(self, needed_level: QueryLevel, message: str) -> None:
        super().__init__(message)
        self.needed_level = needed_level


class BackendError(TrolleyError):
    """A backend answered with an error, or could not be used."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.status = status
        self.retry_after = retry_after  # seconds the server asked us to wait, if it did


class ConnectionFailedError(BackendError):
    """The server could not be reached at all (DNS, refused, timeout, TLS)."""


class AuthenticationError(BackendError):
    """The server refused the credentials (HTTP 401/403, association rejected)."""


class ObjectNotFoundError(BackendError):
    """The server does not hold the object asked for (HTTP 404)."""


class ResponseFormatError(BackendError):
    """The server's answer does not follow the protocol (bad JSON, bad multipart)."""


class AssociationRejectedError(AuthenticationError):
    """A DICOM archive rejected the association (unknown calling or called AE title, ...)."""


class DimseStatusError(BackendError):
    """A DICOM archive answered a C-FIND/C-GET/C-MOVE with a failure or warning status.

    `status` holds the code; the message gives it in hex with its meaning.
    """


class IncompleteRetrievalError(BackendError):
    """Fewer objects arrived than the archive reports as sent (C-GET, C-MOVE)."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        status: int | None = None,
        missing: int = 0,
        missing_uids: list[str] | None = None,
    ) -> None:
        super().__init__(message, url=url, status=status)
        self.missing = missing
        self.missing_uids = list(missing_uids or [])


class DownloadError(TrolleyError):
    """Some retrievals failed; the others were stored (see `stored`)."""

    def __init__(self, failures: list[tuple[object, BaseException]], stored: list) -> None:
        shown = "; ".join(f"{ref}: {exc}" for ref, exc in failures[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        super().__init__(f"{len(failures)} retrieval(s) failed: {shown}{more}")
        self.failures = failures
        self.stored = stored
