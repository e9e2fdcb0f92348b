"""RAD-69 retrieval against a local HTTP server that answers as an IHE Imaging Document Source.

`DocumentSource` parses each SOAP 1.2 RetrieveImagingDocumentSetRequest (IHE RAD TF-3 4.69)
and answers an ITI-43 RetrieveDocumentSetResponse as MTOM/XOP `multipart/related` (root SOAP
part first, then one `application/dicom` part per document, referenced by `cid:`), or with
Failure / PartialSuccess statuses and SOAP faults. The documents are real generated DICOM.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from xml.etree import ElementTree

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from trolley_etl import Query, QueryLevel, Trolley
from trolley_etl._harness.dicomgen import GeneratedInstance, large_series_instances, standard_cohort
from trolley_etl.backends import LocalFolder, Rad69
from trolley_etl.backends.rad69 import SeriesInstances
from trolley_etl.core.errors import (
    DocumentsMissingError,
    DownloadError,
    Rad69Error,
    ResponseFormatError,
)

REPOSITORY = "1.3.6.1.4.1.21367.13.80.110"
SOAP = "http://www.w3.org/2003/05/soap-envelope"
RAD = "urn:ihe:rad:xdsi-b:2009"
XDS = "urn:ihe:iti:xds-b:2007"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
PARTIAL = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
BOUNDARY = "MIMEBoundary_4f1e0c2a9b"


def envelope(status: str, documents: list[tuple[str, str]], errors: list[str] = ()) -> bytes:
    """A RetrieveDocumentSetResponse envelope: documents are (DocumentUniqueId, cid)."""
    error_list = ""
    if errors:
        error_list = (
            "<rs:RegistryErrorList>"
            + "".join(
                '<rs:RegistryError codeContext="Unable to locate SOP" '
                f'errorCode="XDSMissingDocument"'
                f' location="{uid}" severity="urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:'
                f'Error"/>'
                for uid in errors
            )
            + "</rs:RegistryErrorList>"
        )
    docs = "".join(
        f"<DocumentResponse><RepositoryUniqueId>{REPOSITORY}</RepositoryUniqueId>"
        f"<DocumentUniqueId>{uid}</DocumentUniqueId><mimeType>application/dicom</mimeType>"
        f'<Document><xop:Include xmlns:xop="http://www.w3.org/2004/08/xop/include" '
        f'href="cid:{cid}"/></Document></DocumentResponse>'
        for uid, cid in documents
    )
    return (
        f'<?xml version="1.0" encoding="utf-8"?><env:Envelope xmlns:env="{SOAP}"><env:Header>'
        '<a:Action xmlns:a="http://www.w3.org/2005/08/addressing" env:mustUnderstand="true">'
        "urn:ihe:iti:2007:RetrieveDocumentSetResponse</a:Action></env:Header><env:Body>"
        f'<RetrieveDocumentSetResponse xmlns="{XDS}" xmlns:rs="{RS}">'
        f'<rs:RegistryResponse status="{status}">{error_list}</rs:RegistryResponse>{docs}'
        "</RetrieveDocumentSetResponse></env:Body></env:Envelope>"
    ).encode()


def mtom(root: bytes, parts: list[tuple[str, bytes]], *, close: bool = True) -> Iterator[bytes]:
    """An MTOM/XOP multipart body, yielded part by part (the server streams it)."""
    yield (
        (
            f"--{BOUNDARY}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
            f'type="application/soap+xml"\r\nContent-Transfer-Encoding: binary\r\n'
            f"Content-ID: <root.message@trolley.test>\r\n\r\n"
        ).encode()
        + root
        + b"\r\n"
    )
    for cid, data in parts:
        yield (
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n"
            f"Content-Transfer-Encoding: binary\r\nContent-ID: <{cid}>\r\n\r\n"
        ).encode()
        yield data
        yield b"\r\n"
    if close:
        yield f"--{BOUNDARY}--\r\n".encode()


MTOM_TYPE = (
    f'multipart/related; type="application/xop+xml"; boundary="{BOUNDARY}"; '
    'start="<root.message@trolley.test>"; start-info="application/soap+xml"'
)


class DocumentSource:
    """Answers RAD-69 requests from a set of instances; `missing` UIDs are not held."""

    def __init__(self, instances: list[GeneratedInstance], missing: set[str] = frozenset()):
        self.by_uid = {i.sop_uid: i for i in instances}
        self.missing = set(missing)
        self.requests: list[ElementTree.Element] = []

    def __call__(self, request: Request) -> Response:
        assert request.content_type.startswith("application/soap+xml")
        root = ElementTree.fromstring(request.get_data())
        self.requests.append(root)
        uids = [e.text for e in root.iter(f"{{{XDS}}}DocumentUniqueId")]
        held = [u for u in uids if u in self.by_uid and u not in self.missing]
        absent = [u for u in uids if u not in held]
        if not held:
            return Response(envelope(FAILURE, [], absent), content_type="application/soap+xml")
        status = PARTIAL if absent else SUCCESS
        documents = [(uid, f"{n}.doc@trolley.test") for n, uid in enumerate(held)]
        parts = [(cid, self.by_uid[uid].data) for uid, cid in documents]
        body = mtom(envelope(status, documents, absent), parts)
        return Response(body, content_type=MTOM_TYPE)


@pytest.fixture(scope="module")
def cohort() -> list[GeneratedInstance]:
    return standard_cohort()


@pytest.fixture(scope="module")
def folder(cohort, tmp_path_factory) -> LocalFolder:
    """The cohort on disk: the searcher that tells the Trolley which instances exist."""
    root = tmp_path_factory.mktemp("cohort")
    for inst in cohort:
        (root / f"{inst.sop_uid}.dcm").write_bytes(inst.data)
    return LocalFolder(root)


def _rad69(httpserver: HTTPServer, handler) -> Rad69:
    httpserver.expect_request("/rids", method="POST").respond_with_handler(handler)
    return Rad69(httpserver.url_for("/rids"), repository_id=REPOSITORY)


def test_study_download_is_one_request_per_series_and_byte_identical(
    httpserver: HTTPServer, cohort, folder, tmp_path
) -> None:
    source = DocumentSource(cohort)
    trolley = Trolley(searcher=folder, downloader=_rad69(httpserver, source), workers=2)
    study = trolley.find_study(Query(AccessionNumber="ACC1001"))
    stored = trolley.download(study, tmp_path)
    expected = {i.sop_uid: i.data for i in cohort if i.accession_number == "ACC1001"}
    assert {s.sop_instance_uid for s in stored} == set(expected)
    for item in stored:
        assert item.path.read_bytes() == expected[item.sop_instance_uid]
    assert len(source.requests) == 2  # ACC1001 has two series
    for request in source.requests:
        action = request.find(f"{{{SOAP}}}Header/{{http://www.w3.org/2005/08/addressing}}Action")
        assert action is not None and action.text == "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
        body = request.find(f"{{{SOAP}}}Body/{{{RAD}}}RetrieveImagingDocumentSetRequest")
        assert body is not None
        study_request = body.find(f"{{{RAD}}}StudyRequest")
        assert study_request.get("studyInstanceUID") == study.uid
        series_request = study_request.find(f"{{{RAD}}}SeriesRequest")
        documents = series_request.findall(f"{{{XDS}}}DocumentRequest")
        assert {d.findtext(f"{{{XDS}}}RepositoryUniqueId") for d in documents} == {REPOSITORY}
        assert body.find(f"{{{RAD}}}TransferSyntaxUIDList/{{{RAD}}}TransferSyntaxUID") is not None
    assert sorted(len(r.findall(f".//{{{XDS}}}DocumentRequest")) for r in source.requests) == [3, 4]


def test_plan_batches_instances_per_series(cohort) -> None:
    rad69 = Rad69("http://127.0.0.1:9/rids", repository_id=REPOSITORY, batch_size=3)
    from trolley_etl import InstanceReference

    refs = [InstanceReference(i.study_uid, i.series_uid, i.sop_uid) for i in cohort[:7]]
    planned = rad69.plan(refs)
    assert all(isinstance(p, SeriesInstances) for p in planned)
    assert [len(p.instance_uids) for p in planned] == [3, 1, 3]  # 4 + 3 instances, batches of 3


def test_partial_success_stores_what_arrived_and_names_the_missing(
    httpserver: HTTPServer, cohort, folder, tmp_path
) -> None:
    series = [i for i in cohort if i.accession_number == "ACC1005"][:3]
    lost = series[1].sop_uid
    trolley = Trolley(
        searcher=folder, downloader=_rad69(httpserver, DocumentSource(cohort, {lost}))
    )
    found = trolley.find_studies(
        Query(query_level=QueryLevel.SERIES, SeriesInstanceUID=series[0].series_uid)
    )
    with pytest.raises(DownloadError) as raised:
        trolley.download(found, tmp_path)
    ((_, error),) = raised.value.failures
    assert isinstance(error, DocumentsMissingError)
    assert error.missing == [lost] and lost in str(error) and "PartialSuccess" in str(error)
    assert error.errors[0].code == "XDSMissingDocument"
    assert {s.sop_instance_uid for s in raised.value.stored} == {
        series[0].sop_uid,
        series[2].sop_uid,
    }


def test_failure_status_is_a_clear_error(httpserver: HTTPServer, cohort) -> None:
    rad69 = _rad69(httpserver, DocumentSource([]))
    ref = SeriesInstances("1.2.3", "1.2.3.4", ("1.2.3.4.5", "1.2.3.4.6"))
    with pytest.raises(
        Rad69Error, match=r"failed: XDSMissingDocument: Unable to locate SOP \[1\.2\.3\.4\.5\]"
    ):
        rad69.fetch(ref, _NoSink())


def test_soap_fault_with_http_500(httpserver: HTTPServer) -> None:
    fault = (
        f'<?xml version="1.0"?><env:Envelope xmlns:env="{SOAP}"><env:Body><env:Fault>'
        "<env:Code><env:Value>env:Receiver</env:Value><env:Subcode><env:Value>"
        "RepositoryUnavailable</env:Value></env:Subcode></env:Code><env:Reason>"
        '<env:Text xml:lang="en">archive offline for maintenance</env:Text></env:Reason>'
        "</env:Fault></env:Body></env:Envelope>"
    )
    httpserver.expect_request("/rids", method="POST").respond_with_data(
        fault, status=500, content_type="application/soap+xml; charset=utf-8"
    )
    rad69 = Rad69(httpserver.url_for("/rids"), repository_id=REPOSITORY)
    with pytest.raises(Rad69Error) as raised:
        rad69.fetch(SeriesInstances("1.2", "1.2.3", ("1.2.3.4",)), _NoSink())
    assert raised.value.status == 500
    text = str(raised.value)
    assert "env:Receiver/RepositoryUnavailable" in text and "archive offline" in text


def test_truncated_response_leaves_nothing_half_stored(
    httpserver: HTTPServer, cohort, tmp_path
) -> None:
    inst = cohort[0]
    body = b"".join(
        mtom(envelope(SUCCESS, [(inst.sop_uid, "a@b")]), [("a@b", inst.data)], close=False)
    )
    httpserver.expect_request("/rids", method="POST").respond_with_data(
        body[:-200], content_type=MTOM_TYPE
    )
    rad69 = Rad69(httpserver.url_for("/rids"), repository_id=REPOSITORY)
    ref = SeriesInstances(inst.study_uid, inst.series_uid, (inst.sop_uid,))
    with pytest.raises(DownloadError) as raised:
        Trolley(downloader=rad69).download(ref, tmp_path)
    assert isinstance(raised.value.failures[0][1], ResponseFormatError)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_missing_mime_part_is_reported(httpserver: HTTPServer, cohort) -> None:
    a, b = cohort[0], cohort[1]
    root = envelope(SUCCESS, [(a.sop_uid, "a@x"), (b.sop_uid, "b@x")])
    httpserver.expect_request("/rids", method="POST").respond_with_data(
        b"".join(mtom(root, [("a@x", a.data)])), content_type=MTOM_TYPE
    )
    rad69 = Rad69(httpserver.url_for("/rids"), repository_id=REPOSITORY)
    sink = _ListSink()
    with pytest.raises(ResponseFormatError, match=b.sop_uid):
        rad69.fetch(SeriesInstances(a.study_uid, a.series_uid, (a.sop_uid, b.sop_uid)), sink)
    assert sink.committed == [a.data]


class _NoSink:
    def open_instance(self):
        raise AssertionError("nothing should be stored")


class _ListSink:
    def __init__(self) -> None:
        self.committed: list[bytes] = []
        self.writes = 0

    def open_instance(self) -> _ListWriter:
        return _ListWriter(self)


class _ListWriter:
    def __init__(self, sink: _ListSink) -> None:
        self.sink, self.data = sink, bytearray()

    def write(self, chunk: bytes) -> None:
        self.sink.writes += 1
        self.data += chunk

    def commit(self) -> None:
        self.sink.committed.append(bytes(self.data))

    def abort(self) -> None:
        self.data = bytearray()


LARGE_BYTES = 48 * 1024 * 1024
CLIENT = """
import json, re, sys
from trolley_etl import Trolley
from trolley_etl.backends import Rad69
from trolley_etl.backends.rad69 import SeriesInstances
def peak_kb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
url, repository, study, series, uids, out = sys.argv[1:7]
baseline = peak_kb()
ref = SeriesInstances(study, series, tuple(uids.split(",")))
stored = Trolley(downloader=Rad69(url, repository_id=repository), workers=1).download(ref, out)
print(json.dumps({"baseline_kb": baseline, "peak_kb": peak_kb(),
                  "files": {s.sop_instance_uid: s.sha256 for s in stored}}))
"""


def test_large_response_streams_with_flat_memory(httpserver: HTTPServer, tmp_path) -> None:
    instances = list(large_series_instances(LARGE_BYTES, series_count=1))
    total = sum(i.size for i in instances)
    httpserver.expect_request("/rids", method="POST").respond_with_handler(
        DocumentSource(instances)
    )
    first = instances[0]
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CLIENT,
            httpserver.url_for("/rids"),
            REPOSITORY,
            first.study_uid,
            first.series_uid,
            ",".join(i.sop_uid for i in instances),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["files"] == {i.sop_uid: hashlib.sha256(i.data).hexdigest() for i in instances}
    grown = (figures["peak_kb"] - figures["baseline_kb"]) * 1024
    print(
        f"RAD-69 response {total / 2**20:.0f} MiB in {len(instances)} documents: peak RSS "
        f"{figures['peak_kb'] / 1024:.0f} MiB, growth {grown / 2**20:.0f} MiB"
    )
    assert total > 40 * 1024 * 1024
    assert grown < 24 * 1024 * 1024, "memory must not grow with the response"


def test_document_parts_reach_the_sink_in_chunks(httpserver: HTTPServer) -> None:
    instances = list(large_series_instances(9 * 1024 * 1024, series_count=1))
    httpserver.expect_request("/rids", method="POST").respond_with_handler(
        DocumentSource(instances)
    )
    sink = _ListSink()
    rad69 = Rad69(httpserver.url_for("/rids"), repository_id=REPOSITORY)
    first = instances[0]
    ref = SeriesInstances(first.study_uid, first.series_uid, tuple(i.sop_uid for i in instances))
    assert rad69.fetch(ref, sink) == len(instances)
    assert sink.committed == [i.data for i in instances]
    assert sink.writes >= 2 * len(instances)  # several writes per ~4 MiB document
