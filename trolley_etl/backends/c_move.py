"""C-MOVE retrieval (DICOM Query/Retrieve, Study Root, PS3.4 C.4.2) to our own Storage SCP.

The archive opens a second association to the move destination (an AE title it knows with
our host and port) and stores the objects there. trolley-etl runs that Storage SCP itself,
from the first retrieval until `close()`. Several retrievals may run at once through the one
port, so each received object is matched to the request that asked for it: by the Move
Originator Message ID the archive copies into its C-STORE requests (our message IDs are unique
among the moves in flight), checked against the request's UIDs; archives that do not send
the ID are matched by UIDs alone, each request taking each SOP instance once.
"""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from trolley_etl.backends.dimse import (
    STORE_CANNOT_UNDERSTAND,
    STUDY_ROOT_MOVE,
    VERIFICATION,
    DimseSettings,
    StoreReceiver,
    apply_timeouts,
    association,
    check_ae_title,
    check_port,
    check_retrieve_result,
    dimse_settings,
    parse_retrieval_level,
    retrieve_identifier,
    run_retrieve,
)
from trolley_etl.core.backend import Downloader, InstanceSink
from trolley_etl.core.errors import BackendError, ConfigurationError, DimseStatusError
from trolley_etl.core.model import (
    InstanceReference,
    QueryLevel,
    Reference,
    SeriesReference,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from trolley_etl.backends.dimse import DimseOptions

#: C-MOVE status "Refused: Move Destination unknown".
MOVE_DESTINATION_UNKNOWN = 0xA801
#: C-STORE answer to an object no retrieval in flight asked for.
UNSOLICITED = STORE_CANNOT_UNDERSTAND


@dataclass(frozen=True)
class MoveDestination:
    """Our Storage SCP: the AE title and port the archive knows us by, and where to listen.

    `bind` is the local address to listen on; all interfaces by default, since the archive is
    usually another machine.
    """

    aet: str
    port: int
    bind: str = "0.0.0.0"

    def __post_init__(self) -> None:
        check_ae_title("move_destination aet", self.aet)
        check_port(self.port)

    @classmethod
    def from_value(cls, value: MoveDestination | Mapping[str, Any]) -> MoveDestination:
        """The destination as given: already one, or a mapping with aet, port and bind."""
        if isinstance(value, MoveDestination):
            return value
        unknown = set(value) - {"aet", "port", "bind"}
        if unknown or "aet" not in value or "port" not in value:
            raise ConfigurationError(
                f"move_destination needs 'aet' and 'port' (optional 'bind'), got {dict(value)}"
            )
        return cls(str(value["aet"]), int(value["port"]), str(value.get("bind", "0.0.0.0")))


@dataclass(eq=False)
class _MoveRequest:
    """One C-MOVE in flight: what it asked for and where its objects go."""

    msg_id: int
    reference: Reference
    receiver: StoreReceiver
    sop_uids: set[str] = field(default_factory=set)

    def covers(self, study_uid: str, series_uid: str, sop_uid: str) -> bool:
        ref = self.reference
        if ref.study_uid != study_uid:
            return False
        if isinstance(ref, (SeriesReference, InstanceReference)) and ref.series_uid != series_uid:
            return False
        return not (isinstance(ref, InstanceReference) and ref.instance_uid != sop_uid)


class CMove(Downloader):
    """Download with C-MOVE to a Storage SCP that this downloader runs on `move_destination`.

    `retrieval_level="series"` (or "instance") is for archives that refuse study-level moves:
    the Trolley then searches the series and moves them one by one. After the final C-MOVE
    response, objects still on their way get `arrival_grace` seconds to arrive.
    """

    def __init__(
        self,
        host: str | DimseSettings,
        port: int | None = None,
        called_aet: str | None = None,
        calling_aet: str = "TROLLEY",
        *,
        move_destination: MoveDestination | Mapping[str, Any],
        retrieval_level: QueryLevel | str | None = None,
        arrival_grace: float = 5.0,
        **dimse: Unpack[DimseOptions],
    ) -> None:
        """`host` names the archive (with `port`, `called_aet` and `dimse` options), or is
        whole DimseSettings."""
        self.settings = dimse_settings(host, port, called_aet, calling_aet, dimse)
        self.destination = MoveDestination.from_value(move_destination)
        self.retrieval_level = parse_retrieval_level(retrieval_level)
        self.arrival_grace = arrival_grace
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._pending: dict[int, _MoveRequest] = {}
        self._ids = itertools.cycle(range(1, 0x10000))
        self.unsolicited = 0  #: objects received that no retrieval asked for (refused)

    @property
    def destination_name(self) -> str:
        """The destination as error messages name it."""
        return f"{self.destination.aet} (port {self.destination.port})"

    # --- the Storage SCP -----------------------------------------------------------------

    def _ensure_server(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            ae = AE(ae_title=self.destination.aet)
            apply_timeouts(ae, self.settings)
            ae.require_called_aet = True
            for context in AllStoragePresentationContexts:
                ae.add_supported_context(str(context.abstract_syntax), AllTransferSyntaxes)
            ae.add_supported_context(VERIFICATION)
            address = (self.destination.bind, self.destination.port)
            tls = self.settings.tls
            try:
                self._server = ae.start_server(
                    address,
                    block=False,
                    evt_handlers=[(evt.EVT_C_STORE, self._handle_store)],
                    ssl_context=tls.server_context() if tls is not None else None,
                )
            except (OSError, ValueError) as exc:
                raise BackendError(
                    f"C-MOVE destination {self.destination_name}: cannot listen on "
                    f"{self.destination.bind}:{self.destination.port}: {exc}"
                ) from exc

    def _handle_store(self, event: evt.Event) -> int:
        data = event.encoded_dataset()
        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            uids = tuple(
                str(header.get(k, ""))
                for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            )
        except Exception:
            return STORE_CANNOT_UNDERSTAND
        primitive: Any = event.request  # a C_STORE primitive
        request = self._claim(
            primitive.MoveOriginatorMessageID,
            primitive.MoveOriginatorApplicationEntityTitle,
            *uids,
        )
        if request is None:
            with self._lock:
                self.unsolicited += 1
            return UNSOLICITED
        return request.receiver.store(data)

    def _claim(
        self, msg_id: int | None, originator: Any, study: str, series: str, sop: str
    ) -> _MoveRequest | None:
        """The request in flight an object belongs to (and mark it as received there)."""
        originator_aet = originator.decode() if isinstance(originator, bytes) else originator
        ours = originator_aet is None or str(originator_aet).strip() == self.settings.calling_aet
        with self._lock:
            candidates = [r for r in self._pending.values() if r.covers(study, series, sop)]
            preferred = [r for r in candidates if ours and r.msg_id == msg_id]
            for request in [*preferred, *candidates]:
                if sop not in request.sop_uids:
                    request.sop_uids.add(sop)
                    return request
        return None

    # --- retrieval -------------------------------------------------------------------------

    def _register(self, reference: Reference, sink: InstanceSink) -> _MoveRequest:
        with self._lock:
            msg_id = next(self._ids)
            while msg_id in self._pending:
                msg_id = next(self._ids)
            request = _MoveRequest(msg_id, reference, StoreReceiver(sink, self.settings.limits))
            self._pending[msg_id] = request
            return request

    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        """Move everything under `reference` to our Storage SCP and into `sink`; the count."""
        self._ensure_server()
        request = self._register(reference, sink)
        try:
            ae = self.settings.make_ae()
            ae.add_requested_context(STUDY_ROOT_MOVE)
            with association(self.settings, ae, what="C-MOVE") as assoc:
                responses = assoc.send_c_move(
                    retrieve_identifier(reference),
                    self.destination.aet,
                    STUDY_ROOT_MOVE,
                    msg_id=request.msg_id,
                )
                final, last_pending = run_retrieve(responses, assoc, self.settings, "C-MOVE")
            self._await_arrivals(request, final)
            receiver = request.receiver
            try:
                check_retrieve_result(
                    service="C-MOVE",
                    settings=self.settings,
                    reference=reference,
                    final=final,
                    last_counts=last_pending,
                    received=receiver.count,
                    destination=self.destination_name,
                    storage_errors=receiver.errors,
                )
            except DimseStatusError as exc:
                started = final.get("NumberOfCompletedSuboperations") or final.get(
                    "NumberOfFailedSuboperations"
                )
                if exc.status != MOVE_DESTINATION_UNKNOWN and (started or request.sop_uids):
                    raise
                # Orthanc 1.10 answers an unknown destination with 0xC000, not 0xA801.
                raise DimseStatusError(
                    f"{exc}; is the move destination known to the archive? It must list AE "
                    f"title {self.destination.aet!r} with this machine's address and port "
                    f"{self.destination.port}",
                    url=exc.url,
                    status=exc.status,
                ) from None
            return receiver.count
        finally:
            with self._lock:
                self._pending.pop(request.msg_id, None)

    def _await_arrivals(self, request: _MoveRequest, final: Any) -> None:
        """Archives answer after their sub-operations; allow stragglers a short grace."""
        completed = final.get("NumberOfCompletedSuboperations")
        if completed in (None, ""):
            return
        expected = int(completed) + int(final.get("NumberOfWarningSuboperations") or 0)
        deadline = time.monotonic() + self.arrival_grace
        receiver = request.receiver
        while receiver.count + len(receiver.errors) < expected and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        """Stop the Storage SCP."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()

    def __enter__(self) -> CMove:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
