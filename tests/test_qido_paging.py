"""QIDO-RS paging against an archive that caps its answers.

Orthanc's own `LimitFindResults` applies the cap before `offset`, so later pages cannot be
reached through it at all. The capping here is done by a small proxy in front of the real
Orthanc that behaves as PS3.18 8.3.4.4 says a capping server does: it returns at most CAP
results and, when more exist, a `Warning: 299` header (or, in silent mode, no warning).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

import pytest
import requests

from trolley_etl import Query
from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl.backends import QidoRS

STUDY_COUNT = 1200
CAP = 500


class CappingProxy:
    def __init__(self, upstream: str, cap: int, announce: bool) -> None:
        self.upstream, self.cap, self.announce = upstream, cap, announce
        self.requests: list[dict[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                params = [(k, v) for k, v in parse_qsl(query) if k not in ("limit", "offset")]
                given = dict(parse_qsl(query))
                proxy.requests.append(given)
                limit = min(int(given.get("limit", proxy.cap)), proxy.cap)
                offset = int(given.get("offset", 0))
                upstream = requests.get(
                    proxy.upstream + path,
                    params=[*params, ("limit", limit + 1), ("offset", offset)],
                    headers={"Accept": "application/dicom+json"},
                    timeout=30,
                )
                rows = upstream.json() if upstream.content.strip() else []
                more = len(rows) > limit
                body = requests.models.complexjson.dumps(rows[:limit]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                if more and proxy.announce:
                    self.send_header(
                        "Warning", '299 proxy: "There are additional results that can be requested"'
                    )
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def many_studies(tmp_path_factory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-many")).start()
    try:
        server.upload_many(
            make_instance(
                patient_id=f"PG{i:05d}",
                patient_name="Paging^Test",
                study_uid=test_uid("paging-study", i),
                series_uid=test_uid("paging-series", i),
                sop_uid=test_uid("paging-sop", i),
                modality="CT",
                study_date="20240101",
                accession_number=f"PG{i:05d}",
                rows=4,
                columns=4,
            ).data
            for i in range(STUDY_COUNT)
        )
        yield server
    finally:
        server.stop()


def test_uncapped_server_returns_everything(many_studies) -> None:
    studies = QidoRS(many_studies.dicomweb_url, page_size=250).search(Query())
    assert len({s.uid for s in studies}) == STUDY_COUNT


def test_capping_server_with_warning_is_paged_through(many_studies) -> None:
    proxy = CappingProxy(many_studies.dicomweb_url, CAP, announce=True)
    try:
        studies = QidoRS(proxy.url).search(Query())  # default page size 1000 > CAP
        assert len({s.uid for s in studies}) == STUDY_COUNT
        assert [r["offset"] for r in proxy.requests] == ["0", "500", "1000"]
        assert [r["limit"] for r in proxy.requests] == ["1000", "500", "500"]
    finally:
        proxy.close()


def test_silent_cap_needs_a_page_size_below_it(many_studies) -> None:
    proxy = CappingProxy(many_studies.dicomweb_url, CAP, announce=False)
    try:
        studies = QidoRS(proxy.url, page_size=CAP).search(Query())
        assert len({s.uid for s in studies}) == STUDY_COUNT
        limited = QidoRS(proxy.url, page_size=CAP).search(Query(limit=700, offset=100))
        assert len({s.uid for s in limited}) == 700
    finally:
        proxy.close()
