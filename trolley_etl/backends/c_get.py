"""C-GET retrieval (DICOM Query/Retrieve, Study Root, PS3.4 C.4.3).

The archive sends the objects back over the association we opened, as C-STORE requests in
which we act as the Storage SCP. That only works for SOP classes and transfer syntaxes we
proposed with the SCP role, within 128 presentation contexts: see `storage_contexts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pynetdicom import AE, build_role

from trolley_etl.backends.dimse import (
    STUDY_ROOT_GET,
    AssociationPool,
    DimseSettings,
    StoreReceiver,
    check_retrieve_result,
    dimse_settings,
    parse_retrieval_level,
    retrieve_identifier,
    run_retrieve,
    storage_classes_of,
    storage_contexts,
)
from trolley_etl.core.backend import Downloader, InstanceSink
from trolley_etl.core.model import QueryLevel, Reference

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from trolley_etl.backends.dimse import DimseOptions


class CGet(Downloader):
    """Download with C-GET at study, series or instance level, on associations kept open.

    `storage_sop_classes` narrows the storage classes offered (all that pynetdicom knows,
    within the context limit, by default); `retrieval_level="series"` makes the Trolley
    hand over series references for archives that refuse study-level C-GET.
    """

    def __init__(
        self,
        host: str | DimseSettings,
        port: int | None = None,
        called_aet: str | None = None,
        calling_aet: str = "TROLLEY",
        *,
        retrieval_level: QueryLevel | str | None = None,
        storage_sop_classes: Sequence[str] | None = None,
        **dimse: Unpack[DimseOptions],
    ) -> None:
        """`host` names the archive (with `port`, `called_aet` and `dimse` options), or is
        whole DimseSettings."""
        self.settings = dimse_settings(host, port, called_aet, calling_aet, dimse)
        self.retrieval_level = parse_retrieval_level(retrieval_level)
        self.contexts = storage_contexts(storage_sop_classes)
        self.roles = [build_role(uid, scp_role=True) for uid in storage_classes_of(self.contexts)]
        self.pool = AssociationPool()

    def _make_ae(self) -> AE:
        """A requesting AE proposing Study Root C-GET and the storage contexts (SCP role)."""
        ae = self.settings.make_ae()
        ae.add_requested_context(STUDY_ROOT_GET)
        for context in self.contexts:
            ae.add_requested_context(str(context.abstract_syntax), context.transfer_syntax)
        return ae

    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        """Retrieve everything under `reference` with one C-GET into `sink`; returns the count.

        The association comes from the downloader's pool: opened once, used by one
        retrieval at a time, kept for the next one (see `AssociationPool`).
        """
        receiver = StoreReceiver(sink, self.settings.limits)
        with self.pool.use(
            self.settings, self._make_ae, receiver, ext_neg=list(self.roles), what="C-GET"
        ) as assoc:
            responses = assoc.send_c_get(retrieve_identifier(reference), STUDY_ROOT_GET)
            final, last_pending = run_retrieve(responses, assoc, self.settings, "C-GET")
        check_retrieve_result(
            service="C-GET",
            settings=self.settings,
            reference=reference,
            final=final,
            last_counts=last_pending,
            received=receiver.count,
            destination=self.settings.calling_aet,
            storage_errors=receiver.errors,
        )
        return receiver.count

    def close(self) -> None:
        """Release the associations kept open."""
        self.pool.close()

    def __enter__(self) -> CGet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
