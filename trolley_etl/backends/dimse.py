"""Shared DICOM networking (DIMSE) plumbing for the C-FIND, C-GET and C-MOVE backends.

pynetdicom does the protocol; this module turns its flags and status codes into project errors
with messages a PACS administrator can act on (host:port, AE titles, status code and meaning),
and builds the storage presentation contexts a retrieving peer needs.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

from trolley_etl.backends.limits import BackendLimits
from trolley_etl.core.backend import InstanceSink, write_instance
from trolley_etl.core.errors import (
    AssociationRejectedError,
    BackendError,
    ConfigurationError,
    ConnectionFailedError,
    DimseStatusError,
    IncompleteRetrievalError,
    ObjectNotFoundError,
    StorageError,
)
from trolley_etl.core.interrupts import on_abort
from trolley_etl.core.model import InstanceReference, QueryLevel, Reference, SeriesReference
from trolley_etl.core.uids import check_uid

if TYPE_CHECKING:
    from typing_extensions import TypedDict


#: Study Root Query/Retrieve information model SOP classes (PS3.4 C.6.2) and Verification.
STUDY_ROOT_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")
STUDY_ROOT_MOVE = UID("1.2.840.10008.5.1.4.1.2.2.2")
STUDY_ROOT_GET = UID("1.2.840.10008.5.1.4.1.2.2.3")
VERIFICATION = UID("1.2.840.10008.1.1")

#: pynetdicom and DICOM PS3.8 allow at most 128 presentation contexts in one association.
MAX_CONTEXTS = 128
UNCOMPRESSED_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
)
#: Syntaxes offered one presentation context each for the common image classes, so that an
#: archive sends those objects as it stores them instead of transcoding: an acceptor picks
#: one syntax per context, and pynetdicom-based archives pick Implicit VR from a shared list
#: (which loses the VR of private elements).
SEPARATE_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEG2000Lossless,
)
COMMON_IMAGE_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray, for presentation
    "1.2.840.10008.5.1.4.1.1.1.2",  # Digital Mammography, for presentation
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic
)

_LEVEL_NAMES = {
    QueryLevel.STUDY: "STUDY",
    QueryLevel.SERIES: "SERIES",
    QueryLevel.INSTANCE: "IMAGE",
}
_STATUS_TABLES = {
    "C-FIND": QR_FIND_SERVICE_CLASS_STATUS,
    "C-GET": QR_GET_SERVICE_CLASS_STATUS,
    "C-MOVE": QR_MOVE_SERVICE_CLASS_STATUS,
    "C-STORE": STORAGE_SERVICE_CLASS_STATUS,
}
#: C-STORE answers when the sink could not store an object (PS3.4 B.2.3).
STORE_OUT_OF_RESOURCES = 0xA700
STORE_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class DimseTls:
    """DICOM TLS (PS3.15 B.1): files in PEM. `ca_file` verifies the archive's certificate
    (the system's CAs without it); `cert_file`/`key_file` are ours, for archives that ask
    for a client certificate and for the C-MOVE destination we serve."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def client_context(self) -> ssl.SSLContext:
        """For associations we open: the archive's certificate and host name are verified."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def server_context(self) -> ssl.SSLContext:
        """For the C-MOVE destination: our certificate; the archive's is required when a
        CA is given."""
        if not self.cert_file:
            raise ConfigurationError(
                "a C-MOVE destination over TLS needs tls.cert_file (and key_file)"
            )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=self.ca_file)
        context.load_cert_chain(self.cert_file, self.key_file)
        context.verify_mode = ssl.CERT_REQUIRED if self.ca_file else ssl.CERT_NONE
        return context


@dataclass(frozen=True)
class DimseSettings:
    """Where the archive is and how long to wait for it (seconds; None waits forever)."""

    host: str
    port: int
    called_aet: str
    calling_aet: str = "TROLLEY"
    connection_timeout: float | None = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float | None = 120.0
    network_timeout: float | None = 120.0
    max_pdu: int = 0  # 0: no limit on what we receive
    #: Seconds one association may last in total (the timeouts above are idle waits).
    deadline: float | None = 7200.0
    #: Caps shared by every association of the backend (see `backends.limits`).
    limits: BackendLimits | None = field(default=None, compare=False)
    #: DICOM TLS; None for plain TCP.
    tls: DimseTls | None = None

    def __post_init__(self) -> None:
        check_ae_title("called_aet", self.called_aet)
        check_ae_title("calling_aet", self.calling_aet)
        check_port(self.port)

    @property
    def address(self) -> str:
        """`host:port`."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """How errors name the archive: `dicom://CALLED@host:port` (`dicoms://` with TLS)."""
        scheme = "dicoms" if self.tls is not None else "dicom"
        return f"{scheme}://{self.called_aet}@{self.address}"

    def describe(self) -> str:
        """Both AE titles and the address, for messages."""
        return f"{self.calling_aet} -> {self.called_aet} at {self.address}"

    def make_ae(self) -> AE:
        """A requesting AE with these timeouts (contexts are added by the caller)."""
        ae = AE(ae_title=self.calling_aet)
        apply_timeouts(ae, self)
        return ae


def check_ae_title(name: str, value: str) -> None:
    """An AE title is 1-16 printable characters without a backslash (PS3.5 6.2)."""
    if not value or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ConfigurationError(f"{name} {value!r} is not a valid AE title (1-16 characters)")


def check_port(port: int) -> None:
    """A TCP port number."""
    if not 0 < int(port) < 65536:
        raise ConfigurationError(f"port {port} is out of range")


if TYPE_CHECKING:

    class DimseOptions(TypedDict, total=False):
        """The fields of DimseSettings after the AE titles, as keyword arguments."""

        connection_timeout: float | None
        acse_timeout: float
        dimse_timeout: float | None
        network_timeout: float | None
        max_pdu: int
        deadline: float | None
        limits: BackendLimits | None
        tls: DimseTls | None


def dimse_settings(
    target: str | DimseSettings,
    port: int | None,
    called_aet: str | None,
    calling_aet: str,
    options: DimseOptions,
) -> DimseSettings:
    """`target` if it is settings already, else settings for the archive at host `target`.

    Why both: library callers name an archive in one line (`CGet(host, port, "PACS")`), the
    manifest and the runner hand over the settings they built once.
    """
    if isinstance(target, DimseSettings):
        if port is not None or called_aet is not None or options:
            raise ConfigurationError("give either DimseSettings or host, port and AE titles")
        return target
    if port is None or called_aet is None:
        raise ConfigurationError("a DICOM archive needs a host, a port and its called AE title")
    return DimseSettings(target, port, called_aet, calling_aet, **options)


def apply_timeouts(ae: AE, settings: DimseSettings) -> None:
    """Set the settings' timeouts and maximum PDU size on a pynetdicom AE."""
    ae.connection_timeout = settings.connection_timeout
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.maximum_pdu_size = settings.max_pdu


def level_name(level: QueryLevel) -> str:
    """The Query/Retrieve Level value (`IMAGE` for instances)."""
    return _LEVEL_NAMES[level]


def status_meaning(code: int, service: str) -> str:
    """`0xA702 (Failure: Refused: Out of Resources - ...)` for a status code of a service."""
    table = _STATUS_TABLES.get(service, QR_FIND_SERVICE_CLASS_STATUS)
    category, text = table.get(code, (code_to_category(code), "unknown status"))
    return f"0x{code:04X} ({category}: {text})"


def open_association(
    settings: DimseSettings,
    ae: AE,
    *,
    evt_handlers: list[Any] | None = None,
    ext_neg: list[Any] | None = None,
    what: str = "association",
) -> Association:
    """Associate, or raise a project error saying exactly what went wrong."""
    connected = threading.Event()
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, lambda _event: connected.set())]
    handlers.extend(evt_handlers or [])
    tls_args = None
    if settings.tls is not None:
        try:
            tls_args = (settings.tls.client_context(), settings.host)
        except (OSError, ssl.SSLError) as exc:
            raise BackendError(
                f"{what} {settings.describe()}: cannot load the TLS files: {exc}", url=settings.url
            ) from None
    assoc = ae.associate(
        settings.host,
        int(settings.port),
        ae_title=settings.called_aet,
        evt_handlers=handlers,
        ext_neg=ext_neg,
        tls_args=tls_args,
    )
    if assoc.is_established:
        _without_message_logging(assoc)
        return assoc
    where = f"{what} {settings.describe()}"
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        detail = (
            f"{rsp.result_str}, source {rsp.source_str}: {rsp.reason_str}"
            if rsp is not None
            else "no details"
        )
        raise AssociationRejectedError(
            f"{where}: association rejected ({detail}); check that the archive knows the "
            f"calling AE title {settings.calling_aet!r} and is called {settings.called_aet!r}",
            url=settings.url,
        )
    if not connected.is_set():
        tls = " or the TLS handshake failed (certificate not trusted?)" if tls_args else ""
        raise ConnectionFailedError(
            f"{where}: cannot connect to {settings.address} (refused, unreachable or no "
            f"answer within the connection timeout of {settings.connection_timeout} s{tls})",
            url=settings.url,
        )
    raise ConnectionFailedError(
        f"{where}: the archive accepted the connection but did not complete the association "
        f"within the ACSE timeout of {settings.acse_timeout} s (or aborted it)",
        url=settings.url,
    )


#: Events pynetdicom logs by default with handlers of its own, which describe every PDU and
#: DIMSE message in text (and copy each received dataset to see whether it is empty) at any
#: log level: a fifth of the CPU of a C-GET (issue 17). Nothing of ours listens to them.
_LOGGING_EVENTS = (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)


def _without_message_logging(assoc: Association) -> None:
    """Unbind pynetdicom's per-message logging handlers from one association."""
    for event in _LOGGING_EVENTS:
        bound: Any = assoc.get_handlers(event)  # notification events: [(handler, args)]
        for handler, _args in list(bound):
            if getattr(handler, "__module__", "") == "pynetdicom._handlers":
                assoc.unbind(event, handler)


@contextmanager
def association(
    settings: DimseSettings,
    ae: AE,
    *,
    evt_handlers: list[Any] | None = None,
    ext_neg: list[Any] | None = None,
    what: str = "association",
) -> Iterator[Association]:
    """An established association, released on success and aborted on error.

    It holds one of the backend's `max_connections` slots while open.
    """
    limits = settings.limits
    with limits.connection() if limits is not None else nullcontext():
        if limits is not None:
            limits.request()
        assoc = open_association(
            settings, ae, evt_handlers=evt_handlers, ext_neg=ext_neg, what=what
        )
        watch = _watch(assoc, settings.deadline)  # issue 13: total deadline, abort on interrupt
        try:
            yield assoc
        except BaseException:
            if assoc.is_established:
                assoc.abort()
            raise
        finally:
            _unwatch(assoc, watch)
        if assoc.is_established:
            assoc.release()


#: Seconds an association may wait unused in a pool before it is released: the next unit
#: takes it within milliseconds, and an idle pynetdicom association is not free (its two
#: threads poll every millisecond); archives also close idle associations after a while.
POOL_IDLE_SECONDS = 1.0


class _Pooled:
    """One open association of a pool, and the C-STORE receiver of its current retrieval."""

    def __init__(self, limits: BackendLimits | None) -> None:
        self.limits = limits  # whose max_connections slot it holds while open
        self.assoc: Association | None = None
        self.receiver: StoreReceiver | None = None
        self.idle_since = 0.0

    def handle_store(self, event: evt.Event) -> int:
        """EVT_C_STORE handler bound once: hands the object to the retrieval in progress."""
        receiver = self.receiver
        if receiver is None:  # nothing asked for it: refuse rather than store it nowhere
            return STORE_OUT_OF_RESOURCES
        return receiver.handle_store(event)


class AssociationPool:
    """Associations kept open between retrievals of one backend (issue 17).

    Opening an association with 128 presentation contexts and their SCP roles cost about as
    much CPU as receiving a few megabytes; a unit per series paid it per series. A retrieval
    takes an idle association of the pool (or opens one within `max_connections`, whose
    slot it keeps while open), and gives it back when the retrieval ended cleanly; on any
    error it is aborted, never reused. The rate cap (`requests_per_second`) counts
    retrievals, the deadline each retrieval; idle associations are released after
    POOL_IDLE_SECONDS (by a timer) and by `close()`.
    """

    def __init__(self, *, idle_seconds: float = POOL_IDLE_SECONDS) -> None:
        self.idle_seconds = idle_seconds
        self.opened = 0  # associations opened so far (tests, logs)
        self._idle: list[_Pooled] = []
        self._changed = threading.Condition()
        self._closed = False
        self._reaper_due = False

    @contextmanager
    def use(
        self,
        settings: DimseSettings,
        make_ae: Any,
        receiver: StoreReceiver,
        *,
        ext_neg: list[Any] | None = None,
        what: str = "association",
    ) -> Iterator[Association]:
        """An established association whose C-STOREs go to `receiver`, for one retrieval."""
        limits = settings.limits
        pooled = self._take(limits)
        try:
            if limits is not None:
                limits.request()
            if pooled.assoc is None:
                pooled.assoc = open_association(
                    settings,
                    make_ae(),
                    ext_neg=ext_neg,
                    evt_handlers=[(evt.EVT_C_STORE, pooled.handle_store)],
                    what=what,
                )
                with self._changed:
                    self.opened += 1
        except BaseException:
            self._discard(pooled)
            raise
        assoc = pooled.assoc
        pooled.receiver = receiver
        watch = _watch(assoc, settings.deadline)
        try:
            yield assoc
        except BaseException:
            _unwatch(assoc, watch)
            pooled.receiver = None
            self._discard(pooled)
            raise
        _unwatch(assoc, watch)
        pooled.receiver = None
        self._give_back(pooled)

    def close(self) -> None:
        """Release every idle association (those in use are released when given back)."""
        with self._changed:
            self._closed = True
            idle, self._idle = self._idle, []
            self._changed.notify_all()
        for pooled in idle:
            _release(pooled.assoc)
            self._free_slot(pooled)

    def _take(self, limits: BackendLimits | None) -> _Pooled:
        """An idle association (the most recently used), or a new slot to open one in."""
        stale: list[_Pooled] = []
        try:
            with self._changed:
                while True:
                    while self._idle:
                        pooled = self._idle.pop()
                        fresh = time.monotonic() - pooled.idle_since < self.idle_seconds
                        if fresh and pooled.assoc is not None and pooled.assoc.is_established:
                            return pooled
                        stale.append(pooled)
                    if limits is None or limits.try_connection():
                        return _Pooled(limits)
                    self._changed.wait(timeout=0.5)  # a slot freed elsewhere is seen too
        finally:
            for pooled in stale:  # released outside the lock: the peer answers A-RELEASE
                _release(pooled.assoc)
                self._free_slot(pooled)

    def _give_back(self, pooled: _Pooled) -> None:
        assoc = pooled.assoc
        if assoc is None or not assoc.is_established:
            self._discard(pooled)
            return
        pooled.idle_since = time.monotonic()
        with self._changed:
            if not self._closed:
                self._idle.append(pooled)
                self._changed.notify()
                if not self._reaper_due:  # one timer at a time, however many units end
                    self._start_reaper(self.idle_seconds)
                return
        _release(assoc)
        self._free_slot(pooled)

    def _start_reaper(self, after: float) -> None:
        """(Under the lock.) Run `_reap` in `after` seconds."""
        self._reaper_due = True
        reaper = threading.Timer(after + 0.05, self._reap)
        reaper.daemon = True
        reaper.start()

    def _reap(self) -> None:
        """Release the associations idle for `idle_seconds` or longer (the run went on to
        other work, or ended: nothing should keep them polling); look again later while
        others are idle."""
        now = time.monotonic()
        with self._changed:
            old = [p for p in self._idle if now - p.idle_since >= self.idle_seconds]
            self._idle = [p for p in self._idle if p not in old]
            self._reaper_due = False
            if self._idle and not self._closed:
                oldest = min(p.idle_since for p in self._idle)
                self._start_reaper(max(0.0, oldest + self.idle_seconds - now))
        for pooled in old:
            _release(pooled.assoc)
            self._free_slot(pooled)

    def _discard(self, pooled: _Pooled) -> None:
        assoc = pooled.assoc
        if assoc is not None and assoc.is_established:
            assoc.abort()
        self._free_slot(pooled)

    def _free_slot(self, pooled: _Pooled) -> None:
        if pooled.limits is not None:
            pooled.limits.release_connection()
            pooled.limits = None  # a slot is given back once
        with self._changed:
            self._changed.notify()


def _release(assoc: Association | None) -> None:
    if assoc is not None and assoc.is_established:
        with suppress(Exception):
            assoc.release()


_open_lock = threading.Lock()
_open: dict[int, Association] = {}
#: Why an association was aborted by us (deadline, interrupt), by id; read by its error.
_cut: dict[int, str] = {}


def _watch(assoc: Association, deadline: float | None) -> threading.Timer | None:
    with _open_lock:
        _open[id(assoc)] = assoc
    if deadline is None:
        return None
    reason = f"the association took longer than the deadline of {deadline:g} s"
    timer = threading.Timer(deadline, _cut_association, (assoc, reason))
    timer.daemon = True
    timer.start()
    return timer


def _unwatch(assoc: Association, timer: threading.Timer | None) -> None:
    if timer is not None:
        timer.cancel()
    with _open_lock:
        _open.pop(id(assoc), None)


def _cut_association(assoc: Association, reason: str) -> bool:
    with _open_lock:
        if id(assoc) not in _open:
            return False
        _cut[id(assoc)] = reason
    assoc.abort()
    # a thread waiting for the next DIMSE message would wait the whole DIMSE timeout: wake it
    # with the "no message" pynetdicom itself gives when the peer goes away
    with suppress(Exception):
        assoc.dimse.msg_queue.put((None, None))
    return True


def abort_associations() -> int:
    """Abort every open association now (the run is stopping)."""
    with _open_lock:
        open_now = list(_open.values())
    return sum(_cut_association(a, "the association was stopped (interrupted)") for a in open_now)


on_abort(abort_associations)


def lost_association_error(
    assoc: Association, settings: DimseSettings, service: str
) -> ConnectionFailedError:
    """The error for a response that never came (pynetdicom yields an empty status)."""
    with _open_lock:
        cut = _cut.pop(id(assoc), None)
    if cut is not None:
        return ConnectionFailedError(f"{service} {settings.describe()}: {cut}", url=settings.url)
    if assoc.is_aborted:
        reason = "the association was aborted"
    else:
        reason = f"no response within the DIMSE timeout of {settings.dimse_timeout} s"
    return ConnectionFailedError(f"{service} {settings.describe()}: {reason}", url=settings.url)


def status_of(status: Dataset) -> int | None:
    """The Status of a DIMSE response, or None when it has none."""
    return int(status.Status) if "Status" in status else None


def describe_reference(reference: Reference) -> str:
    """A reference as messages name it (`study 1.2.3`, `series ...`)."""
    if isinstance(reference, InstanceReference):
        return f"instance {reference.instance_uid}"
    if isinstance(reference, SeriesReference):
        return f"series {reference.series_uid}"
    return f"study {reference.study_uid}"


def retrieve_identifier(reference: Reference) -> Dataset:
    """The C-GET/C-MOVE identifier for a reference: the level and its unique keys only."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level_name(reference.level)
    identifier.StudyInstanceUID = check_uid(reference.study_uid, "StudyInstanceUID")
    if isinstance(reference, (SeriesReference, InstanceReference)):
        identifier.SeriesInstanceUID = check_uid(reference.series_uid, "SeriesInstanceUID")
    if isinstance(reference, InstanceReference):
        identifier.SOPInstanceUID = check_uid(reference.instance_uid, "SOPInstanceUID")
    return identifier


def _count(status: Dataset, keyword: str) -> int | None:
    value = status.get(keyword)
    return int(value) if value not in (None, "") else None


def failed_uids(status: Dataset) -> list[str]:
    """The Failed SOP Instance UID List of a final C-GET/C-MOVE response, if any."""
    value = status.get("FailedSOPInstanceUIDList")
    if not value:
        return []
    if isinstance(value, str):
        return [v for v in value.split("\\") if v]
    return [str(v) for v in value]


def check_retrieve_result(
    *,
    service: str,
    settings: DimseSettings,
    reference: Reference,
    final: Dataset,
    last_counts: Dataset | None,
    received: int,
    destination: str,
    storage_errors: Sequence[BaseException] = (),
) -> None:
    """Compare a C-GET/C-MOVE final status and sub-operation counts with what arrived.

    Raises the first storage error (the archive saw it as a failed sub-operation), a
    DimseStatusError for a failure or warning status, IncompleteRetrievalError when fewer
    objects arrived than the archive reports as sent, ObjectNotFoundError when nothing matched.
    """
    code = status_of(final)
    what = f"{service} of {describe_reference(reference)} {settings.describe()}"
    if storage_errors:
        first = storage_errors[0]
        raise StorageError(
            f"{what}: {len(storage_errors)} received object(s) could not be stored: {first}"
        ) from first
    counts = final if "NumberOfCompletedSuboperations" in final else (last_counts or final)
    completed = _count(counts, "NumberOfCompletedSuboperations")
    failed = _count(counts, "NumberOfFailedSuboperations") or 0
    warning = _count(counts, "NumberOfWarningSuboperations") or 0
    uids = failed_uids(final)
    if code is None:
        raise BackendError(f"{what}: the final response has no status", url=settings.url)
    category = code_to_category(code)
    if category not in ("Success", "Warning"):
        shown = f"; failed instances: {', '.join(uids[:5])}" if uids else ""
        done = (
            f" ({completed} completed, {failed} failed, {warning} warning sub-operations)"
            if completed is not None
            else ""
        )
        raise DimseStatusError(
            f"{what}: status {status_meaning(code, service)}{done}{shown}",
            url=settings.url,
            status=code,
        )
    expected = None if completed is None else completed + warning
    if expected is not None and received < expected:
        raise IncompleteRetrievalError(
            f"{what}: the archive reports {expected} object(s) sent but {received} arrived "
            f"at {destination}; {expected - received} missing",
            url=settings.url,
            status=code,
            missing=expected - received,
            missing_uids=uids,
        )
    if failed or category == "Warning":
        shown = f"; failed instances: {', '.join(uids[:5])}" if uids else ""
        raise DimseStatusError(
            f"{what}: status {status_meaning(code, service)}, {failed} of "
            f"{(completed or 0) + failed + warning} sub-operations failed{shown}",
            url=settings.url,
            status=code,
        )
    if received == 0:
        raise ObjectNotFoundError(
            f"{what}: the archive holds nothing for {describe_reference(reference)}",
            url=settings.url,
            status=code,
        )


def storage_contexts(
    sop_classes: Sequence[str] | None = None,
    *,
    budget: int = MAX_CONTEXTS - 1,
) -> list[PresentationContext]:
    """Storage contexts for a C-GET: compressed variants of common classes, then every class.

    An association carries at most 128 contexts and a context agrees on one transfer syntax,
    so not every class can be offered in every syntax. The common image classes get one
    context per syntax in SEPARATE_SYNTAXES (the archive can then send those objects as
    stored); every other class pynetdicom knows gets one context with the uncompressed
    syntaxes, in pynetdicom's order, until the budget (128 minus the Query/Retrieve context)
    is spent.
    """
    if sop_classes is not None:
        classes = list(dict.fromkeys(sop_classes))
        compressed_for = [c for c in classes if c in COMMON_IMAGE_CLASSES]
    else:
        known = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
        classes = list(dict.fromkeys([*COMMON_IMAGE_CLASSES, *known]))
        compressed_for = list(COMMON_IMAGE_CLASSES)
    contexts: list[PresentationContext] = []
    for sop_class in compressed_for:
        contexts.extend(build_context(sop_class, syntax) for syntax in SEPARATE_SYNTAXES)
    for sop_class in classes:
        if sop_class not in compressed_for:
            contexts.append(build_context(sop_class, list(UNCOMPRESSED_SYNTAXES)))
    if sop_classes is not None and len(contexts) > budget:
        raise ConfigurationError(
            f"{len(contexts)} storage presentation contexts asked for; at most {budget} fit"
        )
    return contexts[:budget]


def storage_classes_of(contexts: Sequence[PresentationContext]) -> list[UID]:
    """The SOP classes of the contexts, each once, in order."""
    return list(dict.fromkeys(UID(str(cx.abstract_syntax)) for cx in contexts))


def parse_retrieval_level(value: QueryLevel | str | None) -> QueryLevel | None:
    """`"series"` -> QueryLevel.SERIES; None means any level."""
    if value is None or isinstance(value, QueryLevel):
        return value
    try:
        return QueryLevel(value.lower())
    except ValueError:
        raise ConfigurationError(
            f"retrieval_level {value!r} is not one of study, series, instance"
        ) from None


class StoreReceiver:
    """Writes each received C-STORE dataset to a sink, as the archive sent it.

    The C-STORE response is success only once the sink has committed the object; a storage
    failure is answered with a failure status (so the archive counts a failed sub-operation)
    and kept for the retrieval to raise.
    """

    def __init__(self, sink: InstanceSink, limits: BackendLimits | None = None) -> None:
        self.sink = sink
        self.limits = limits
        self.count = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def store(self, data: bytes) -> int:
        """Store one Part 10 object; return the C-STORE status.

        With a byte rate cap the answer waits, which holds the archive back.
        """
        if self.limits is not None:
            self.limits.received(len(data))
        try:
            write_instance(self.sink, data)
        except Exception as exc:
            with self._lock:
                self.errors.append(exc)
            return (
                STORE_CANNOT_UNDERSTAND
                if isinstance(exc, StorageError)
                else (STORE_OUT_OF_RESOURCES)
            )
        with self._lock:
            self.count += 1
        return 0x0000

    def handle_store(self, event: evt.Event) -> int:
        """EVT_C_STORE handler: the encoded dataset with file meta, never re-encoded."""
        return self.store(event.encoded_dataset())


def run_retrieve(
    responses: Iterator[tuple[Dataset, Dataset | None]],
    assoc: Association,
    settings: DimseSettings,
    service: str,
) -> tuple[Dataset, Dataset | None]:
    """Read C-GET/C-MOVE responses to the final one; return (final status, last pending).

    The final status gets the Failed SOP Instance UID List of the final identifier, if any.
    """
    last_pending: Dataset | None = None
    for status, identifier in responses:
        code = status_of(status)
        if code is None:
            raise lost_association_error(assoc, settings, service)
        if code_to_category(code) == "Pending":
            last_pending = status
            continue
        if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
            status.FailedSOPInstanceUIDList = identifier.FailedSOPInstanceUIDList
        return status, last_pending
    raise lost_association_error(assoc, settings, service)
