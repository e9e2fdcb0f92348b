"""Query splitting: searches at an archive's result cap, against an Orthanc that caps them.

Orthanc's `LimitFindResults` caps QIDO-RS answers (at the limit + 1) and C-FIND answers (at
the limit), silently: without splitting, a search over the month below would lose studies.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl import Query, QueryLevel, Study
from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl.backends import DicomQR, QidoRS
from trolley_etl.cli.main import main
from trolley_etl.core.errors import ResultsCappedError
from trolley_etl.core.splitting import SplittingSearcher, date_bounds, split_query

CAP = 5
#: Ten studies on ten days of January 2024 and seven more on one busy day, hour by hour.
DAYS = [f"202401{d:02d}" for d in (2, 3, 5, 8, 9, 12, 20, 22, 28, 31)]
BUSY_DAY = "20240115"
STUDIES = [(day, "120000") for day in DAYS] + [(BUSY_DAY, f"{h:02d}3000") for h in range(8, 15)]
MONTH = "20240101-20240131"


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(
        tmp_path_factory.mktemp("orthanc-capped"),
        extra_config={"LimitFindResults": CAP, "LimitFindInstances": CAP},
    ).start()
    try:
        server.upload_many(
            make_instance(
                patient_id=f"SPLIT{i:02d}",
                patient_name="Split^Test",
                study_uid=test_uid("split-study", i),
                series_uid=test_uid("split-series", i),
                sop_uid=test_uid("split-sop", i),
                modality="CT",
                study_date=date,
                study_time=time,
                accession_number=f"SPL{i:03d}",
                rows=4,
                columns=4,
            ).data
            for i, (date, time) in enumerate(STUDIES)
        )
        yield server
    finally:
        server.stop()


def uids(studies: list[Study]) -> set[str]:
    return {s.uid for s in studies}


ALL_UIDS = {test_uid("split-study", i) for i in range(len(STUDIES))}


@pytest.mark.archive
def test_orthanc_caps_silently_without_max_results(capped: OrthancServer) -> None:
    """The premise: the archive answers a part of the month and says nothing."""
    found = QidoRS(capped.dicomweb_url).search(Query(StudyDate=MONTH))
    assert 0 < len(found) < len(STUDIES)
    dimse = DicomQR("127.0.0.1", capped.dicom_port, capped.aet)
    assert len(dimse.search(Query(StudyDate=MONTH))) == CAP


@pytest.mark.archive
def test_qido_rs_splits_by_date_then_time(capped: OrthancServer) -> None:
    events: list[dict] = []
    searcher = QidoRS(capped.dicomweb_url, max_results=CAP)
    searcher.on_split = lambda name, **fields: events.append({"event": name, **fields})
    found = searcher.search(Query(StudyDate=MONTH))
    assert uids(found) == ALL_UIDS
    assert len(found) == len(STUDIES)
    # the busy day had to be split by StudyTime
    assert any("StudyTime" in part for e in events for part in e["parts"])
    assert all(e["event"] == "search.split" for e in events)


@pytest.mark.archive
def test_c_find_splits_by_date_then_time(capped: OrthancServer) -> None:
    searcher = DicomQR("127.0.0.1", capped.dicom_port, capped.aet, max_results=CAP)
    found = searcher.search(Query(StudyDate=MONTH, ModalitiesInStudy="CT"))
    assert uids(found) == ALL_UIDS


@pytest.mark.archive
def test_a_capped_query_without_a_date_range_is_an_error(capped: OrthancServer) -> None:
    for searcher in (
        QidoRS(capped.dicomweb_url, max_results=CAP),
        DicomQR("127.0.0.1", capped.dicom_port, capped.aet, max_results=CAP),
    ):
        with pytest.raises(ResultsCappedError, match="no StudyDate range"):
            searcher.search(Query(PatientID="SPLIT*"))


@pytest.mark.archive
def test_limit_and_offset_apply_to_the_united_answer(capped: OrthancServer) -> None:
    searcher = QidoRS(capped.dicomweb_url, max_results=CAP)
    everything = searcher.search(Query(StudyDate=MONTH, limit=100))
    assert uids(everything) == ALL_UIDS
    page = searcher.search(Query(StudyDate=MONTH, limit=6, offset=3))
    dates = sorted((str(s.data.StudyDate), str(s.data.StudyTime), s.uid) for s in everything)
    assert [s.uid for s in page] == [uid for *_, uid in dates[3:9]]


@pytest.mark.archive
def test_plan_command_splits_with_the_manifest_cap(
    capped: OrthancServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"""\
version: 1
name: split-test
source:
  search: {{backend: qido-rs, url: "{capped.dicomweb_url}", max_results: {CAP}}}
queries:
  - name: month
    filters: {{StudyDate: {MONTH}}}
storage:
  root: ./data
"""
    )
    assert main(["plan", str(manifest), "--format", "json", "--log-format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {row["study_uid"] for row in out["studies"]} == ALL_UIDS


@pytest.mark.archive
def test_plan_command_reports_an_unsplittable_cap(
    capped: OrthancServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"""\
version: 1
name: split-test
source:
  search: {{backend: dicom-qr, host: 127.0.0.1, port: {capped.dicom_port},
           called_aet: {capped.aet}, max_results: {CAP}}}
queries:
  - name: everyone
    filters: {{PatientID: "SPLIT*"}}
storage:
  root: ./data
"""
    )
    assert main(["plan", str(manifest), "--log-format", "json"]) == 2
    assert "no StudyDate range" in capsys.readouterr().err


# --- in-process: the splitting rules --------------------------------------------------------


def test_split_query_halves_dates_then_times() -> None:
    parts = split_query(Query(StudyDate="20240101-20240131"))
    assert [p.filters["StudyDate"] for p in parts or []] == [
        "20240101-20240116",
        "20240117-20240131",
    ]
    day = split_query(Query(StudyDate="20240115", ModalitiesInStudy="CT"))
    assert [(p.filters["StudyDate"], p.filters["StudyTime"]) for p in day or []] == [
        ("20240115", "000000-115959"),
        ("20240115", "120000-235959"),
    ]
    assert all(p.filters["ModalitiesInStudy"] == "CT" for p in day or [])
    narrow = split_query(Query(StudyDate="20240115", StudyTime="10-1001"))
    assert [p.filters["StudyTime"] for p in narrow or []] == ["100000-100059", "100100-100159"]
    assert split_query(Query(StudyDate="20240115", StudyTime="100000-100000")) is None
    assert split_query(Query(PatientID="1")) is None
    assert split_query(Query(query_level=QueryLevel.SERIES, StudyDate=MONTH)) is None
    listed = split_query(Query(StudyDate=["20240101", "20240105-20240107"]))
    assert [p.filters["StudyDate"] for p in listed or []] == ["20240101", "20240105-20240107"]


def test_open_date_ranges_are_closed() -> None:
    today = dt.date(2026, 1, 1)
    assert date_bounds("20240101-", today) == (dt.date(2024, 1, 1), today)
    assert date_bounds("-20240101", today) == (dt.date(1900, 1, 1), dt.date(2024, 1, 1))
    assert date_bounds("20240101", today) == (dt.date(2024, 1, 1), dt.date(2024, 1, 1))


class _CappedByWarning:
    """A searcher whose archive signals more results than it answers (no max_results)."""

    def __init__(self) -> None:
        self.queries: list[Query] = []

    def search(self, query: Query) -> list[Study]:
        self.queries.append(query)
        if query.filters["StudyDate"] == MONTH:
            raise ResultsCappedError("Warning 299 and nothing past offset 5")
        return [Study(test_uid("fake", str(query.filters["StudyDate"])))]

    def close(self) -> None:
        pass


def test_a_backend_signal_splits_without_max_results() -> None:
    inner = _CappedByWarning()
    found = SplittingSearcher(inner, None).search(Query(StudyDate=MONTH))  # type: ignore[arg-type]
    assert len(found) == 2 and len(inner.queries) == 3


def test_studies_lost_by_the_parts_are_an_error() -> None:
    """An archive whose parts miss a study the whole answer had (no StudyTime) is reported."""

    class NoTime:
        def search(self, query: Query) -> list[Study]:
            if "StudyTime" in query.filters:
                return []
            return [Study(test_uid("no-time", i)) for i in range(CAP)]

        def close(self) -> None:
            pass

    with pytest.raises(ResultsCappedError, match="match none of its parts"):
        SplittingSearcher(NoTime(), CAP).search(Query(StudyDate="20240101"))  # type: ignore[arg-type]


class AnnouncingArchive:
    """Answers at most CAP_299 studies with `Warning: 299`, and nothing past offset 0: the
    archive says more results exist but will not page to them (a hostile answer)."""

    CAP_299 = 2

    def __init__(self, days: list[str]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qsl, urlsplit

        archive = self
        self.days = days
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                archive.requests += 1
                params = dict(parse_qsl(urlsplit(self.path).query))
                first, _, last = params["StudyDate"].partition("-")
                matching = [d for d in archive.days if first <= d <= (last or first)]
                offset = int(params.get("offset", 0))
                rows = [] if offset else matching[: archive.CAP_299]
                body = json.dumps(
                    [
                        {
                            "0020000D": {"vr": "UI", "Value": [test_uid("announcing", day)]},
                            "00080020": {"vr": "DA", "Value": [day]},
                        }
                        for day in rows
                    ]
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                if len(matching) > archive.CAP_299:
                    self.send_header("Warning", '299 archive: "There are additional results"')
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.archive
def test_qido_warning_299_without_paging_is_split() -> None:
    archive = AnnouncingArchive(DAYS)
    try:
        found = QidoRS(archive.url).search(Query(StudyDate=MONTH))  # no max_results given
    finally:
        archive.close()
    assert uids(found) == {test_uid("announcing", day) for day in DAYS}
