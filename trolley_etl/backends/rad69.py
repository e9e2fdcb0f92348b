"""IHE RAD-69 Retrieve Imaging Document Set (IHE RAD TF-3 4.69), streamed.

The request (RAD TF-3 4.69.4.1.2) is a SOAP 1.2 envelope with WS-Addressing action
`urn:ihe:rad:2009:RetrieveImagingDocumentSet` whose body is one
`RetrieveImagingDocumentSetRequest` (namespace `urn:ihe:rad:xdsi-b:2009`): a StudyRequest,
a SeriesRequest, one DocumentRequest per instance (RepositoryUniqueId, DocumentUniqueId =
SOP Instance UID, namespace `urn:ihe:iti:xds-b:2007`) and a TransferSyntaxUIDList.

The response is the ITI-43 Retrieve Document Set Response (ITI TF-2b 3.43.4.2, RAD TF-3
4.69.4.2): `multipart/related; type="application/xop+xml"` (MTOM/XOP, ITI TF-2x Appendix V)
whose root part is the SOAP envelope with a `rs:RegistryResponse` status (Success,
PartialSuccess or Failure with a RegistryErrorList) and one DocumentResponse per document,
each pointing at a MIME part by `<xop:Include href="cid:..."/>`. The root part is small and
parsed in memory; every document part is streamed to the sink as it arrives.

Requests are batched per series (one POST carries every instance of a series), because
RAD-69 can only name instances and a request per instance would be slow.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote
from xml.etree import ElementTree
from xml.etree.ElementTree import Element

import requests

from trolley_etl.backends.http import (
    HttpSettings,
    http_settings,
    iter_body,
    raise_for_status,
    redact_url,
)
from trolley_etl.backends.multipart import boundary_from_content_type, stream_related
from trolley_etl.backends.xmlsafe import children, descendants, local_name, parse_xml
from trolley_etl.core.backend import Downloader, InstanceSink, InstanceWriter, write_instance
from trolley_etl.core.errors import (
    ConfigurationError,
    DocumentsMissingError,
    MissingReferencesError,
    Rad69Error,
    ResponseFormatError,
)
from trolley_etl.core.model import (
    InstanceReference,
    QueryLevel,
    Reference,
    Retrievable,
    SeriesInstances,
    contained_references,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from trolley_etl.backends.http import HttpOptions

SOAP_ENV = "http://www.w3.org/2003/05/soap-envelope"
WSA = "http://www.w3.org/2005/08/addressing"
IHE_RAD = "urn:ihe:rad:xdsi-b:2009"
IHE_XDS = "urn:ihe:iti:xds-b:2007"
ACTION = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
STATUS_SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
STATUS_PARTIAL = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
STATUS_FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
#: Transfer syntaxes offered by default: the common ones, so the source can send what it
#: holds without transcoding (RAD TF-3 4.69.4.1.2: it picks one from the list).
DEFAULT_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)
DEFAULT_BATCH_SIZE = 500
#: The root SOAP part lists every document; a few MiB is far more than any real one needs.
MAX_ROOT_BYTES = 16 * 1024 * 1024

#: The prefixes of the request envelope, declared on its root element.
_PREFIXES = {"xmlns:s": SOAP_ENV, "xmlns:a": WSA, "xmlns:iherad": IHE_RAD, "xmlns:ihe": IHE_XDS}


@dataclass(frozen=True)
class RegistryError:
    """One `rs:RegistryError` of a RegistryResponse (ebRS 3.0, ITI TF-2b 3.43.4.2.3)."""

    code: str
    context: str
    location: str
    severity: str

    def __str__(self) -> str:
        where = f" [{self.location}]" if self.location else ""
        return f"{self.code}: {self.context}{where}".strip(": ")


class Rad69(Downloader):
    """Download instances from an IHE Imaging Document Source (RAD-69)."""

    retrieval_level = QueryLevel.INSTANCE

    def __init__(
        self,
        url: str | HttpSettings,
        *,
        repository_id: str,
        session: requests.Session | None = None,
        transfer_syntaxes: Sequence[str] = DEFAULT_TRANSFER_SYNTAXES,
        batch_size: int = DEFAULT_BATCH_SIZE,
        **http: Unpack[HttpOptions],
    ) -> None:
        """`url` is the base URL (with `http` options) or whole HttpSettings."""
        if not repository_id:
            raise ConfigurationError("repository_id (the source's RepositoryUniqueId) is required")
        if batch_size < 1:
            raise ConfigurationError("batch_size must be at least 1")
        self.http = http_settings(url, http).client(session)
        self.repository_id = repository_id
        self.transfer_syntaxes = tuple(transfer_syntaxes)
        self.batch_size = batch_size

    # --- planning: one request per series --------------------------------------------------

    def plan(self, objects: Sequence[Retrievable]) -> list[Reference]:
        """One SeriesInstances per series (split every `batch_size` instances)."""
        batches: dict[tuple[str, str], list[str]] = {}
        for ref in contained_references(objects, QueryLevel.INSTANCE):
            if isinstance(ref, SeriesInstances):
                batches.setdefault((ref.study_uid, ref.series_uid), []).extend(ref.instance_uids)
            elif isinstance(ref, InstanceReference):
                batches.setdefault((ref.study_uid, ref.series_uid), []).append(ref.instance_uid)
        planned: list[Reference] = []
        for (study_uid, series_uid), uids in batches.items():
            unique = list(dict.fromkeys(uids))
            for start in range(0, len(unique), self.batch_size):
                chunk = tuple(unique[start : start + self.batch_size])
                planned.append(SeriesInstances(study_uid, series_uid, chunk))
        return planned

    # --- retrieval ----------------------------------------------------------------------------

    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        """Retrieve the instances under `reference` in batches into `sink`; the count."""
        if isinstance(reference, InstanceReference):
            reference = SeriesInstances(
                reference.study_uid, reference.series_uid, (reference.instance_uid,)
            )
        if not isinstance(reference, SeriesInstances) or not reference.instance_uids:
            raise MissingReferencesError(
                QueryLevel.INSTANCE, f"RAD-69 retrieves named instances, not {reference}"
            )
        body = self.request_body(reference)
        response = self.http.post(
            "",
            data=body,
            headers={
                "Content-Type": f'application/soap+xml; charset=UTF-8; action="{ACTION}"',
                "Accept": "multipart/related, application/soap+xml",
            },
            stream=True,
            check=False,
        )
        with response:
            return self._read_response(response, reference, sink)

    def request_body(self, reference: SeriesInstances) -> bytes:
        """The SOAP 1.2 envelope of a RetrieveImagingDocumentSetRequest (RAD TF-3 4.69.4.1.2)."""
        # prefixed names and their xmlns declarations written as they are: no entry in
        # ElementTree's process-wide prefix registry (register_namespace) is needed
        envelope = Element("s:Envelope", _PREFIXES)
        header = ElementTree.SubElement(envelope, "s:Header")
        action = ElementTree.SubElement(header, "a:Action")
        action.set("s:mustUnderstand", "1")
        action.text = ACTION
        ElementTree.SubElement(header, "a:MessageID").text = f"urn:uuid:{uuid.uuid4()}"
        reply_to = ElementTree.SubElement(header, "a:ReplyTo")
        reply_to.set("s:mustUnderstand", "1")
        address = ElementTree.SubElement(reply_to, "a:Address")
        address.text = "http://www.w3.org/2005/08/addressing/anonymous"
        ElementTree.SubElement(header, "a:To").text = redact_url(self.http.base_url)
        body = ElementTree.SubElement(envelope, "s:Body")
        request = ElementTree.SubElement(body, "iherad:RetrieveImagingDocumentSetRequest")
        study = ElementTree.SubElement(request, "iherad:StudyRequest")
        study.set("studyInstanceUID", reference.study_uid)
        series = ElementTree.SubElement(study, "iherad:SeriesRequest")
        series.set("seriesInstanceUID", reference.series_uid)
        for instance_uid in reference.instance_uids:
            document = ElementTree.SubElement(series, "ihe:DocumentRequest")
            repository = ElementTree.SubElement(document, "ihe:RepositoryUniqueId")
            repository.text = self.repository_id
            ElementTree.SubElement(document, "ihe:DocumentUniqueId").text = instance_uid
        syntaxes = ElementTree.SubElement(request, "iherad:TransferSyntaxUIDList")
        for syntax in self.transfer_syntaxes:
            ElementTree.SubElement(syntaxes, "iherad:TransferSyntaxUID").text = syntax
        return bytes(ElementTree.tostring(envelope, encoding="utf-8", xml_declaration=True))

    def _read_response(
        self, response: requests.Response, reference: SeriesInstances, sink: InstanceSink
    ) -> int:
        url = redact_url(response.url)
        content_type = response.headers.get("Content-Type", "")
        media = content_type.split(";")[0].strip().lower()
        if response.status_code >= 400:
            if media in ("application/soap+xml", "text/xml", "application/xml"):
                raise_fault(_limited(response, url), url=url, status=response.status_code)
            raise_for_status(response)
        if media == "multipart/related":
            boundary = boundary_from_content_type(content_type)
            if not boundary:
                raise ResponseFormatError(f"{url}: multipart answer without a boundary", url=url)
            reader = _MtomReader(sink, url, _start_parameter(content_type))
            stream_related(iter_body(response, url), boundary, reader.open_part, url=url)
            if reader.root is None:
                raise ResponseFormatError(f"{url}: no SOAP root part in the answer", url=url)
            result = parse_response(reader.root, url=url)
        elif media in ("application/soap+xml", "application/xop+xml", "text/xml"):
            reader = _MtomReader(sink, url, None)
            result = parse_response(_limited(response, url), url=url)
        else:
            raise ResponseFormatError(
                f"{url}: expected multipart/related or application/soap+xml, got {content_type!r}",
                url=url,
            )
        stored = reader.stored_count + _store_inline(result, sink, url)
        return _check_result(result, reader, reference, stored, url)

    def close(self) -> None:
        """Close the pooled connections."""
        self.http.close()


# --- the response ------------------------------------------------------------------------------


@dataclass
class DocumentResponse:
    """One document of a RAD-69 answer: its ids and MTOM part."""

    document_uid: str
    content_id: str | None  # the cid of an xop:Include, None when the document is inline
    inline: Element | None = None


@dataclass
class RetrieveResult:
    """What one RAD-69 request returned: status, errors and documents."""

    status: str
    errors: list[RegistryError] = field(default_factory=list)
    documents: list[DocumentResponse] = field(default_factory=list)


def normalise_cid(value: str) -> str:
    """`<a@b>` (Content-ID header) and `cid:a%40b` (href, RFC 2392) as one comparable form."""
    value = value.strip()
    if value.lower().startswith("cid:"):
        value = unquote(value[4:])
    return value.strip("<>")


def raise_fault(data: bytes, *, url: str, status: int | None) -> None:
    """Raise Rad69Error for a SOAP 1.2 Fault (SOAP 1.2 Part 1, 5.4) or a Failure answer."""
    root = parse_xml(data, url=url, what="the RAD-69 answer")
    faults = descendants(root, "Fault")
    if faults:
        fault = faults[0]
        codes = [t.text.strip() for t in descendants(fault, "Value") if t.text]
        reasons = [t.text.strip() for t in descendants(fault, "Text") if t.text]
        code = "/".join(codes) or "unknown code"
        reason = "; ".join(reasons) or "no reason given"
        shown = f" (HTTP {status})" if status else ""
        raise Rad69Error(
            f"{url}: RAD-69 SOAP fault{shown}: {code}: {reason}", url=url, status=status
        )
    result = parse_response(data, url=url)
    _raise_failure(result, url, status)
    raise Rad69Error(f"{url}: HTTP {status} with a {result.status} answer", url=url, status=status)


def parse_response(data: bytes, *, url: str) -> RetrieveResult:
    """Status, errors and document references of a RetrieveDocumentSetResponse envelope."""
    root = parse_xml(data, url=url, what="the RAD-69 SOAP part")
    if descendants(root, "Fault"):
        raise_fault(data, url=url, status=None)
    answers = descendants(root, "RetrieveDocumentSetResponse")
    if local_name(root) != "Envelope" or not answers:
        raise ResponseFormatError(
            f"{url}: expected a SOAP envelope with a RetrieveDocumentSetResponse", url=url
        )
    registry = children(answers[0], "RegistryResponse")
    if not registry:
        raise ResponseFormatError(f"{url}: the answer has no RegistryResponse", url=url)
    result = RetrieveResult(status=registry[0].get("status", ""))
    for error in descendants(registry[0], "RegistryError"):
        result.errors.append(
            RegistryError(
                code=error.get("errorCode", ""),
                context=error.get("codeContext", ""),
                location=error.get("location", ""),
                severity=error.get("severity", "").rsplit(":", 1)[-1],
            )
        )
    for document in children(answers[0], "DocumentResponse"):
        uid = "".join(t.text or "" for t in children(document, "DocumentUniqueId")).strip()
        content = children(document, "Document")
        includes = descendants(content[0], "Include") if content else []
        if includes:
            href = includes[0].get("href", "")
            result.documents.append(DocumentResponse(uid, normalise_cid(href)))
        elif content:
            result.documents.append(DocumentResponse(uid, None, inline=content[0]))
        else:
            raise ResponseFormatError(f"{url}: DocumentResponse {uid} has no Document", url=url)
    return result


def _raise_failure(result: RetrieveResult, url: str, status: int | None = None) -> None:
    if result.status == STATUS_FAILURE:
        shown = "; ".join(str(e) for e in result.errors[:5]) or "no RegistryError given"
        more = f" (and {len(result.errors) - 5} more)" if len(result.errors) > 5 else ""
        raise Rad69Error(
            f"{url}: RAD-69 retrieval failed: {shown}{more}",
            url=url,
            status=status,
            errors=result.errors,
        )
    if result.status not in (STATUS_SUCCESS, STATUS_PARTIAL):
        raise ResponseFormatError(f"{url}: unknown RegistryResponse status {result.status!r}")


def _check_result(
    result: RetrieveResult,
    reader: _MtomReader,
    reference: SeriesInstances,
    stored: int,
    url: str,
) -> int:
    """Success only when every requested document arrived; say which did not otherwise."""
    _raise_failure(result, url)
    announced = {d.document_uid for d in result.documents}
    missing_parts = [
        d.document_uid
        for d in result.documents
        if d.content_id is not None and d.content_id not in reader.received
    ]
    if missing_parts:
        raise ResponseFormatError(
            f"{url}: the SOAP part references {len(missing_parts)} document(s) whose MIME part "
            f"never came: {', '.join(missing_parts[:5])}",
            url=url,
        )
    missing = [uid for uid in reference.instance_uids if uid not in announced]
    if missing or result.status == STATUS_PARTIAL:
        errors = "; ".join(str(e) for e in result.errors[:5])
        raise DocumentsMissingError(
            f"{url}: RAD-69 returned {stored} of {len(reference.instance_uids)} document(s) "
            f"(status {result.status.rsplit(':', 1)[-1]}); missing: "
            f"{', '.join(missing[:10]) or 'none named'}"
            + (f"; errors: {errors}" if errors else ""),
            url=url,
            missing=missing,
            stored=stored,
            errors=result.errors,
        )
    return stored


def _store_inline(result: RetrieveResult, sink: InstanceSink, url: str) -> int:
    """Documents sent base64 inside the SOAP body (no MTOM); rare, but allowed."""
    count = 0
    for document in result.documents:
        if document.inline is None:
            continue
        try:
            data = base64.b64decode("".join(document.inline.itertext()), validate=False)
        except (binascii.Error, ValueError):
            raise ResponseFormatError(
                f"{url}: document {document.document_uid} is not valid base64", url=url
            ) from None
        write_instance(sink, data)
        count += 1
    return count


def _limited(response: requests.Response, url: str) -> bytes:
    data = b""
    for chunk in iter_body(response, url):
        data += chunk
        if len(data) > MAX_ROOT_BYTES:
            raise ResponseFormatError(f"{url}: SOAP answer larger than {MAX_ROOT_BYTES} bytes")
    return data


def _start_parameter(content_type: str) -> str | None:
    """The `start` parameter of a multipart/related Content-Type (RFC 2387): the root's cid."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "start":
            return normalise_cid(value.strip().strip('"'))
    return None


class _RootWriter:
    """Keeps the (small) SOAP root part in memory."""

    def __init__(self, reader: _MtomReader) -> None:
        self._reader = reader
        self._data = bytearray()

    def write(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > MAX_ROOT_BYTES:
            raise ResponseFormatError(
                f"{self._reader.url}: SOAP root part larger than {MAX_ROOT_BYTES} bytes"
            )

    def commit(self) -> None:
        self._reader.root = bytes(self._data)

    def abort(self) -> None:
        self._data = bytearray()


class _DocumentWriter:
    """Streams one document part into the sink and notes its Content-ID once complete."""

    def __init__(self, reader: _MtomReader, content_id: str) -> None:
        self._reader = reader
        self._content_id = content_id
        self._writer: InstanceWriter = reader.sink.open_instance()

    def write(self, chunk: bytes) -> None:
        self._writer.write(chunk)

    def commit(self) -> None:
        self._writer.commit()
        self._reader.received.add(self._content_id)
        self._reader.stored_count += 1

    def abort(self) -> None:
        self._writer.abort()


class _MtomReader:
    """Routes the parts of an MTOM/XOP answer: the root to memory, documents to the sink."""

    def __init__(self, sink: InstanceSink, url: str, start: str | None) -> None:
        self.sink = sink
        self.url = url
        self.start = start
        self.root: bytes | None = None
        self.received: set[str] = set()
        self.stored_count = 0
        self._parts = 0

    def open_part(self, headers: dict[str, str]) -> InstanceWriter:
        content_id = normalise_cid(headers.get("content-id", ""))
        first = self._parts == 0
        self._parts += 1
        is_root = content_id == self.start if self.start else first
        if is_root:
            return _RootWriter(self)
        return _DocumentWriter(self, content_id)
