"""Every error trolley-etl raises on purpose, in one tree.

Callers (the CLI, CI scripts, code using the library) catch a branch of the tree instead of
parsing messages, and map it to an exit code and a one-line message instead of a traceback.
Whether a failure is worth another attempt is a property of its type (`transient`), which the
runner's retry policy reads; nothing else decides it.

    TrolleyError
    ├── ConfigurationError            the manifest, a setting or an argument is unusable (exit 2)
    │   ├── ManifestError             a manifest file fails validation (`issues` lists each)
    │   ├── ManifestChangedError      the checkpoint was resolved from another manifest
    │   │   ├── LockOutdatedError     the lock file was made for another manifest
    │   │   └── LayoutChangedError    storage.layout changed under recorded files
    │   ├── LockFileError             a lock file that cannot be read or does not fit
    │   ├── LayoutError               a layout template that cannot be used
    │   ├── DeidSettingsError         de-identification cannot start as configured
    │   ├── ExecutorSettingsError     the Dask executor cannot do what the manifest asks
    │   └── ProfileTableMissingError  the PS3.15 table package is not installed
    ├── QueryError                    a malformed query: unknown keyword, bad date, bad type
    ├── InvalidUidError               a UID that is empty, multi-valued or not UID syntax
    ├── MatchError                    a search that had to find exactly one thing did not
    │   ├── NoMatchError              ... it found nothing
    │   └── SeveralMatchesError       ... it found more than one
    ├── MissingReferencesError        the object tree does not reach the level needed
    ├── ResultsCappedError            a search hit the archive's cap and could not be split
    ├── MetadataError                 the metadata table cannot be built as asked
    ├── StorageError                  a dataset could not be stored
    │   ├── DiskFullError             the disk of the storage root is full
    │   ├── ObjectExistsError         another object lies at the key (never overwritten)
    │   └── LayoutConflictError       a new layout maps two stored files to one path
    ├── RunError                      a run cannot start or go on
    │   ├── RootBusyError             another run holds the storage root's lock
    │   ├── OutsideWindowError        outside the run window, told not to wait
    │   ├── CheckpointDamagedError    the checkpoint file is not a usable SQLite database
    │   └── IncompleteUnitError       a unit stored fewer instances than the archive said
    ├── DownloadError                 some retrievals failed; the others were stored
    └── BackendError                  an archive answered with an error, or could not be used
        ├── ConnectionFailedError     not reachable: DNS, refused, timeout, TLS     (transient)
        │   └── ArchiveUnavailableError   ... through every retry of an outage wait
        ├── AuthenticationError       credentials refused (HTTP 401/403)            (permanent)
        │   ├── AssociationRejectedError  a DICOM association was rejected
        │   └── CredentialsUnsendableError  credentials that cannot go in a request
        ├── ObjectNotFoundError       the server does not hold the object (HTTP 404) (permanent)
        ├── ResponseFormatError       the answer breaks the protocol                (transient)
        │   ├── ResponseTooLargeError     an answer held in memory grew past its limit
        │   ├── UnexpectedInstanceError   an object that was not asked for arrived
        │   ├── ObjectTooLargeError       an object grew past the maximum size
        │   └── MultipartParseError       a multipart body that cannot be cut into parts
        ├── ChecksumRejectedError     object storage computed another SHA-256      (transient)
        ├── DimseStatusError          a C-FIND/C-GET/C-MOVE failure or warning status
        ├── IncompleteRetrievalError  fewer objects arrived than the archive reports as sent
        └── Rad69Error                a RAD-69 SOAP fault or Failure status
            └── DocumentsMissingError     some requested documents did not arrive

A `BackendError` without its own rule is transient when it has no status or an HTTP status
that asks to come back later (408, 425, 429, 5xx); every other error is permanent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trolley_etl.core.model import QueryLevel
    from trolley_etl.core.storage import StoredInstance

#: HTTP statuses that ask the client to try again later.
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class TrolleyError(Exception):
    """Base class of every error trolley-etl raises on purpose."""

    @property
    def transient(self) -> bool:
        """True when the same request may succeed if tried again later."""
        return False


# --- configuration -----------------------------------------------------------------------------


class ConfigurationError(TrolleyError, ValueError):
    """The manifest, a setting or an argument cannot be used: fix it, do not retry."""


class ManifestError(ConfigurationError):
    """A manifest that cannot be used; `issues` holds every problem found."""

    def __init__(self, issues: Sequence[object]) -> None:
        super().__init__("\n".join(str(issue) for issue in issues))
        self.issues = list(issues)


class ManifestChangedError(ConfigurationError):
    """The checkpoint was resolved from a manifest that would pull something else."""


class LockOutdatedError(ManifestChangedError):
    """The lock file was made for a manifest that pulled something else."""


class LayoutChangedError(ManifestChangedError):
    """`storage.layout` changed while files stored under the old one are recorded."""


class LockFileError(ConfigurationError):
    """A lock file that cannot be read, or that belongs to another version of the manifest."""


class LayoutError(ConfigurationError):
    """A storage layout template that cannot be used (empty part, unknown keyword, ...)."""


class DeidSettingsError(ConfigurationError):
    """De-identification cannot start as configured (a usage error, exit 2)."""


class ExecutorSettingsError(ConfigurationError):
    """The manifest asks the Dask executor for something it cannot do (exit 2)."""


class ProfileTableMissingError(ConfigurationError):
    """The package that ships the PS3.15 table is not installed."""


# --- searching -----------------------------------------------------------------------------------


class QueryError(TrolleyError, ValueError):
    """A query is malformed: unknown keyword, bad date or time, wrong value type."""


class InvalidUidError(TrolleyError, ValueError):
    """A UID that is empty, multi-valued or not DICOM UID syntax; never retried."""


class MatchError(TrolleyError):
    """A search that had to match exactly one thing did not (see the two subclasses)."""


class NoMatchError(MatchError):
    """The search matched nothing."""


class SeveralMatchesError(MatchError):
    """The search matched more than one object where one was expected."""


#: The name before no match and several matches were told apart.
NotFoundError = MatchError


class MissingReferencesError(TrolleyError):
    """The object tree does not reach the level that is needed.

    Raised by `contained_references` and by downloaders that can only fetch series or
    instances. The Trolley catches it and asks its searcher for the missing levels.
    """

    def __init__(self, needed_level: QueryLevel, message: str) -> None:
        super().__init__(message)
        self.needed_level = needed_level


class ResultsCappedError(TrolleyError):
    """A search returned as many results as the archive's cap and could not be split."""


class MetadataError(TrolleyError):
    """The table cannot be built as asked (unknown keyword, missing optional library)."""


# --- storing -------------------------------------------------------------------------------------


class StorageError(TrolleyError):
    """A dataset could not be stored (unreadable DICOM, bad layout template, disk error)."""


class DiskFullError(StorageError):
    """The disk holding the storage root is full: not retried, the run stops (issue 13)."""


class ObjectExistsError(StorageError):
    """A different object already lies at the key: it is reported, never overwritten."""


class LayoutConflictError(StorageError):
    """The new layout maps two stored files to one path."""


# --- running -------------------------------------------------------------------------------------


class RunError(TrolleyError):
    """A run cannot start or cannot go on."""


class RootBusyError(RunError):
    """Another run holds the lock on this storage root."""


class OutsideWindowError(RunError):
    """The run is outside its time window and was told not to wait (`run --no-wait`)."""


class CheckpointDamagedError(RunError):
    """The checkpoint file exists but SQLite cannot use it."""


class IncompleteUnitError(RunError):
    """A unit stored fewer instances than the archive said it holds."""

    def __init__(self, expected: int, stored: int, missing: list[str]) -> None:
        self.expected, self.stored, self.missing = expected, stored, missing
        super().__init__(f"expected {expected} instances, stored {stored}")


class DownloadError(TrolleyError):
    """Some retrievals failed; the others were stored (see `stored`)."""

    def __init__(
        self, failures: list[tuple[object, BaseException]], stored: list[StoredInstance]
    ) -> None:
        shown = "; ".join(f"{ref}: {exc}" for ref, exc in failures[:3])
        more = f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""
        super().__init__(f"{len(failures)} retrieval(s) failed: {shown}{more}")
        self.failures = failures
        self.stored = stored


# --- archives ------------------------------------------------------------------------------------


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

    @property
    def transient(self) -> bool:
        """No status, or an HTTP status that asks to come back later."""
        return self.status is None or self.status in RETRYABLE_STATUS


class ConnectionFailedError(BackendError):
    """The server could not be reached at all (DNS, refused, timeout, TLS)."""

    @property
    def transient(self) -> bool:
        """Networks and servers come back."""
        return True


class ArchiveUnavailableError(ConnectionFailedError):
    """The archive could not be reached, or answered only 5xx, through every retry."""


class AuthenticationError(BackendError):
    """The server refused the credentials (HTTP 401/403, association rejected)."""

    @property
    def transient(self) -> bool:
        """The same credentials will be refused again."""
        return False


class AssociationRejectedError(AuthenticationError):
    """A DICOM archive rejected the association (unknown calling or called AE title, ...)."""


class CredentialsUnsendableError(AuthenticationError):
    """The credentials cannot be put in a request (not Latin-1, a line break): never retried,
    and the message never shows them."""


class ObjectNotFoundError(BackendError):
    """The server does not hold the object asked for (HTTP 404)."""

    @property
    def transient(self) -> bool:
        """Asking again will not make the object appear."""
        return False


class ResponseFormatError(BackendError):
    """The server's answer does not follow the protocol (bad JSON, bad multipart)."""

    @property
    def transient(self) -> bool:
        """Mostly truncated or garbled transfers, which a second attempt usually gets whole."""
        return True


class ResponseTooLargeError(ResponseFormatError):
    """An answer read into memory grew past its limit."""


class UnexpectedInstanceError(ResponseFormatError):
    """The archive sent an object that is not part of what was asked for."""


class ObjectTooLargeError(ResponseFormatError):
    """An object grew past the configured maximum size."""


class MultipartParseError(ResponseFormatError):
    """A `multipart/related` body this parser cannot cut into parts (raised without the URL
    while parsing; the caller names the answer it came from)."""


class ChecksumRejectedError(BackendError):
    """Object storage computed another SHA-256 than the one sent: the bytes went wrong on
    the way, so another attempt is worth it."""

    @property
    def transient(self) -> bool:
        """Always: a second upload of the same file usually arrives whole."""
        return True


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


class Rad69Error(BackendError):
    """The source answered a RAD-69 request with a SOAP fault or a Failure status.

    `errors` holds the RegistryError entries of the answer.
    """

    def __init__(
        self, message: str, *, url: str, status: int | None = None, errors: Sequence[object] = ()
    ) -> None:
        super().__init__(message, url=url, status=status)
        self.errors = list(errors)


class DocumentsMissingError(Rad69Error):
    """Some requested documents did not arrive (PartialSuccess); the others were stored."""

    def __init__(
        self,
        message: str,
        *,
        url: str,
        missing: Sequence[str],
        stored: int,
        errors: Sequence[object],
    ) -> None:
        super().__init__(message, url=url, errors=errors)
        self.missing = list(missing)
        self.stored = stored


__all__ = [
    "RETRYABLE_STATUS",
    "ArchiveUnavailableError",
    "AssociationRejectedError",
    "AuthenticationError",
    "BackendError",
    "CheckpointDamagedError",
    "ConfigurationError",
    "ConnectionFailedError",
    "CredentialsUnsendableError",
    "DeidSettingsError",
    "DimseStatusError",
    "DiskFullError",
    "DocumentsMissingError",
    "DownloadError",
    "IncompleteRetrievalError",
    "IncompleteUnitError",
    "InvalidUidError",
    "LayoutChangedError",
    "LayoutConflictError",
    "LayoutError",
    "LockFileError",
    "LockOutdatedError",
    "ManifestChangedError",
    "ManifestError",
    "MatchError",
    "MetadataError",
    "MissingReferencesError",
    "NoMatchError",
    "NotFoundError",
    "ObjectNotFoundError",
    "ObjectTooLargeError",
    "OutsideWindowError",
    "ProfileTableMissingError",
    "QueryError",
    "Rad69Error",
    "ResponseFormatError",
    "ResponseTooLargeError",
    "ResultsCappedError",
    "RootBusyError",
    "RunError",
    "SeveralMatchesError",
    "StorageError",
    "TrolleyError",
    "UnexpectedInstanceError",
]
