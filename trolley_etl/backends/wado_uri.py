"""WADO-URI retrieval (PS3.18 9): one instance per request.

It can only fetch instances, so a study or series given to it goes through the Trolley's
instance fallback (the searcher lists the instances first). The instances of one series
become one unit (`SeriesInstances`), fetched with several requests in flight: a unit per
instance cost a checkpoint transaction and a completeness check per file, and one request
at a time left the connection idle while each answer was written (issue 17).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import requests

from trolley_etl.backends.http import (
    HttpSettings,
    http_settings,
    iter_body,
)
from trolley_etl.backends.limits import DEFAULT_MAX_CONNECTIONS
from trolley_etl.backends.multipart import stream_single
from trolley_etl.core.arrival import CheckedSink
from trolley_etl.core.backend import Downloader, InstanceSink
from trolley_etl.core.errors import (
    ConfigurationError,
    MissingReferencesError,
    ObjectNotFoundError,
)
from trolley_etl.core.model import (
    InstanceReference,
    QueryLevel,
    Reference,
    Retrievable,
    SeriesInstances,
    contained_references,
)
from trolley_etl.core.uids import check_uid

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from trolley_etl.backends.http import HttpOptions


class WadoURI(Downloader):
    """Download single instances with `?requestType=WADO&...&contentType=application/dicom`.

    `parallel` is how many requests the downloader keeps in flight across all units
    (default: the backend's `max_connections`, else 4): a unit's helper requests use only
    slots no other unit's worker holds (see `_Batch`), and the connection cap holds
    anyway, since every request waits for one of the pool's `max_connections` connections.
    """

    retrieval_level = QueryLevel.INSTANCE

    def __init__(
        self,
        url: str | HttpSettings,
        *,
        session: requests.Session | None = None,
        transfer_syntax: str | None = None,
        parallel: int | None = None,
        **http: Unpack[HttpOptions],
    ) -> None:
        """`url` is the base URL (with `http` options) or whole HttpSettings."""
        if parallel is not None and parallel < 1:
            raise ConfigurationError("parallel must be at least 1")
        self.http = http_settings(url, http).client(session)
        self.transfer_syntax = transfer_syntax
        limits = self.http.limits
        cap = limits.max_connections if limits is not None else None
        self._parallel = parallel or cap or DEFAULT_MAX_CONNECTIONS
        #: Requests in flight across all units (see `_Batch`): one per connection.
        self._slots = threading.BoundedSemaphore(self._parallel)

    def plan(self, objects: Sequence[Retrievable]) -> list[Reference]:
        """One unit per series: SeriesInstances naming its instances (a lone instance
        stays an InstanceReference, so a failure names it)."""
        by_series: dict[tuple[str, str], list[str]] = {}
        for ref in contained_references(objects, QueryLevel.INSTANCE):
            for inner in ref.contained_references(QueryLevel.INSTANCE):
                if isinstance(inner, InstanceReference):
                    key = (inner.study_uid, inner.series_uid)
                    by_series.setdefault(key, []).append(inner.instance_uid)
        planned: list[Reference] = []
        for (study_uid, series_uid), listed in by_series.items():
            uids = tuple(dict.fromkeys(listed))
            if len(uids) == 1:
                planned.append(InstanceReference(study_uid, series_uid, uids[0]))
            else:
                planned.append(SeriesInstances(study_uid, series_uid, uids))
        return planned

    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        """Retrieve one instance, or the named instances of a series, into `sink`; the count.

        Each instance is checked against its own SOPInstanceUID. An instance the archive
        does not hold does not stop the others; the unit then fails naming every one of
        them. Any other error stops new requests, lets those in flight end, and is raised.
        """
        if isinstance(reference, InstanceReference):
            return self._fetch_one(reference, sink)
        if not isinstance(reference, SeriesInstances) or not reference.instance_uids:
            raise MissingReferencesError(
                QueryLevel.INSTANCE, f"WADO-URI retrieves single instances, not {reference}"
            )
        instances = reference.contained_references(QueryLevel.INSTANCE)
        batch = _Batch(instances, sink, self._fetch_one, self._slots, self._parallel)
        return batch.run()

    def _fetch_one(self, reference: Reference, sink: InstanceSink) -> int:
        assert isinstance(reference, InstanceReference)
        params: dict[str, object] = {
            "requestType": "WADO",
            "studyUID": check_uid(reference.study_uid, "StudyInstanceUID"),
            "seriesUID": check_uid(reference.series_uid, "SeriesInstanceUID"),
            "objectUID": check_uid(reference.instance_uid, "SOPInstanceUID"),
            "contentType": "application/dicom",
        }
        if self.transfer_syntax:
            params["transferSyntax"] = self.transfer_syntax
        response = self.http.get("", params=params, stream=True)
        with response:
            return stream_single(iter_body(response, response.url), sink)

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()


class _Batch:
    """The instances of one unit, fetched by the worker thread and by helper threads that
    each hold one of the downloader's request slots while they have work.

    The slots (one per connection) are shared by every unit, and the worker holds one for
    its whole unit: with all workers busy no helper starts, so a run with as many workers
    as connections keeps exactly one request per unit in flight; as units run out (the
    last studies of a cohort, or a single large series) their helpers take the idle slots.
    """

    def __init__(
        self,
        instances: Sequence[Reference],
        sink: InstanceSink,
        fetch_one: Callable[[Reference, InstanceSink], int],
        slots: threading.BoundedSemaphore,
        most: int,
    ) -> None:
        self.fetch_one, self.sink, self.slots = fetch_one, sink, slots
        self.most = most  # threads on this unit at most (worker included)
        self.total = len(instances)
        self.stored = 0
        self.not_found: list[InstanceReference] = []
        self.errors: list[BaseException] = []
        self._todo = list(reversed(instances))
        self._lock = threading.Lock()
        self._helpers: list[threading.Thread] = []

    def run(self) -> int:
        """Fetch everything (this thread and its helpers); raise what went wrong."""
        with self.slots:
            try:
                self._loop(spawn=True)
            finally:
                for helper in self._helpers:
                    helper.join()
        if self.errors:
            raise self.errors[0]
        if self.not_found:
            shown = ", ".join(ref.instance_uid for ref in self.not_found[:5])
            more = f" and {len(self.not_found) - 5} more" if len(self.not_found) > 5 else ""
            raise ObjectNotFoundError(
                f"WADO-URI: the archive does not hold {len(self.not_found)} of {self.total} "
                f"instance(s) of series {self.not_found[0].series_uid}: {shown}{more}"
            )
        return self.stored

    def _next(self) -> Reference | None:
        with self._lock:
            if self.errors or not self._todo:  # after an error (not a 404) nothing new starts
                return None
            return self._todo.pop()

    def _loop(self, *, spawn: bool) -> None:
        while (ref := self._next()) is not None:
            if spawn:
                self._spawn_helpers()
            try:
                self.fetch_one(ref, _instance_sink(self.sink, ref))
            except ObjectNotFoundError:
                with self._lock:
                    if isinstance(ref, InstanceReference):
                        self.not_found.append(ref)
            except BaseException as error:
                with self._lock:
                    self.errors.append(error)
                return
            else:
                with self._lock:
                    self.stored += 1

    def _spawn_helpers(self) -> None:
        """Start a helper for each idle slot while this unit has work left for it."""
        while len(self._helpers) + 1 < self.most:
            with self._lock:
                if len(self._todo) <= len(self._helpers):
                    return
            if not self.slots.acquire(blocking=False):
                return
            helper = threading.Thread(target=self._help, name="wado-uri-helper", daemon=True)
            self._helpers.append(helper)
            helper.start()

    def _help(self) -> None:
        try:
            self._loop(spawn=False)
        finally:
            self.slots.release()


def _instance_sink(sink: InstanceSink, ref: Reference) -> CheckedSink:
    """A sink that admits only the object `ref` names (its exact SOPInstanceUID).

    The unit's own CheckedSink (the runner's, for the whole series) is replaced rather than
    wrapped when `ref` lies within its reference: the instance check covers the unit's, and
    one check per object instead of two keeps the per-file work down.
    """
    if isinstance(sink, CheckedSink) and all(
        getattr(ref, key, None) == value for key, value in _uids_of(sink.reference).items()
    ):
        return CheckedSink(sink.sink, ref, max_object_bytes=sink.max_object_bytes, root=sink.root)
    return CheckedSink(sink, ref)


def _uids_of(reference: Reference) -> dict[str, str]:
    uids = {"study_uid": reference.study_uid}
    for key in ("series_uid", "instance_uid"):
        value = getattr(reference, key, None)
        if value:
            uids[key] = value
    return uids
