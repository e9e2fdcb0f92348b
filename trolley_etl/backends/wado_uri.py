"""WADO-URI retrieval (PS3.18 9): one instance per request.

It can only fetch instances, so a study or series given to it goes through the Trolley's
instance fallback (the searcher lists the instances first). The instances of one series
become one unit (`SeriesInstances`), fetched with several requests in flight: a unit per
instance cost a checkpoint transaction and a completeness check per file, and one request
at a time left the connection idle while each answer was written (issue 17).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
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
from trolley_etl.core.engine import execute
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

    `parallel` is how many requests one unit keeps in flight (default: the backend's
    `max_connections`, else 4); the connection cap still holds across all units, since
    every request waits for one of the pool's `max_connections` connections.
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
        self.parallel = parallel

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
        return _fetch_all(instances, sink, self._fetch_one, self._parallel(len(instances)))

    def _parallel(self, count: int) -> int:
        limits = self.http.limits
        cap = limits.max_connections if limits is not None else None
        wanted = self.parallel or cap or DEFAULT_MAX_CONNECTIONS
        return max(1, min(wanted, count))

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


def _fetch_all(
    instances: Sequence[Reference],
    sink: InstanceSink,
    fetch_one: Callable[[Reference, InstanceSink], int],
    parallel: int,
) -> int:
    """Fetch `instances` with `parallel` requests in flight, each checked against its SOP."""
    stored = 0
    not_found: list[InstanceReference] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def todo() -> Iterator[Reference]:
        for ref in instances:
            if errors:  # stop asking once something other than a 404 went wrong
                return
            yield ref

    def done(ref: Reference, error: BaseException | None) -> None:
        nonlocal stored
        with lock:
            if error is None:
                stored += 1
            elif isinstance(error, ObjectNotFoundError) and isinstance(ref, InstanceReference):
                not_found.append(ref)
            else:
                errors.append(error)

    execute(
        todo(),
        lambda ref: fetch_one(ref, _instance_sink(sink, ref)),
        workers=parallel,
        on_done=done,
        name="wado-uri",
    )
    if errors:
        raise errors[0]
    if not_found:
        shown = ", ".join(ref.instance_uid for ref in not_found[:5])
        more = f" and {len(not_found) - 5} more" if len(not_found) > 5 else ""
        raise ObjectNotFoundError(
            f"WADO-URI: the archive does not hold {len(not_found)} of {len(instances)} "
            f"instance(s) of series {not_found[0].series_uid}: {shown}{more}"
        )
    return stored


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
