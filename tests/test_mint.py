"""MINT search against a local HTTP server that answers in the MINT XML format.

No installable server speaks MINT, so `MintServer` below plays one: it holds the standard
cohort, filters on the parameters a MINT server understands (study level only) and answers
`<studySearchResults xmlns="http://medical.nema.org/mint">` with `<study studyUUID=...>`
elements carrying `<attr tag vr val/>`, nested `<series>` and `<instance>` by QueryLevel.
"""

from __future__ import annotations

import fnmatch
import uuid
from xml.sax.saxutils import quoteattr

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from trolley_etl import Query, QueryLevel, Trolley
from trolley_etl._harness.dicomgen import COHORT_STUDIES, GeneratedInstance, standard_cohort
from trolley_etl.backends import LocalFolder, Mint
from trolley_etl.core.errors import AuthenticationError, BackendError, ResponseFormatError

NS = "http://medical.nema.org/mint"
STUDIES = {spec.accession_number: spec for spec in COHORT_STUDIES}


def _attr(tag: str, vr: str, value: object) -> str:
    return f'<attr tag="{tag}" vr="{vr}" val={quoteattr(str(value))}/>'


def _study_attrs(inst: GeneratedInstance) -> str:
    return "".join(
        [
            _attr("00100020", "LO", inst.patient_id),
            _attr("00100010", "PN", inst.patient_name),
            _attr("0020000d", "UI", inst.study_uid),
            _attr("00080050", "SH", inst.accession_number),
            _attr("00080020", "DA", inst.study_date),
            _attr("00080030", "TM", inst.study_time),
            _attr("00081030", "LO", inst.study_description),
        ]
    )


class MintServer:
    """A MINT study search over the cohort, with the parameter semantics of MINT servers."""

    def __init__(self, instances: list[GeneratedInstance], honour_offset: bool = True) -> None:
        self.instances = instances
        self.honour_offset = honour_offset
        self.requests: list[dict[str, str]] = []

    def studies(self, args: dict[str, str]) -> list[list[GeneratedInstance]]:
        by_study: dict[str, list[GeneratedInstance]] = {}
        for inst in self.instances:
            by_study.setdefault(inst.study_uid, []).append(inst)
        selected = []
        for members in by_study.values():
            first = members[0]
            checks = {
                "PatientID": first.patient_id,
                "AccessionNumber": first.accession_number,
                "StudyInstanceUID": first.study_uid,
                "PatientName": first.patient_name,
            }
            if any(k in args and not fnmatch.fnmatchcase(v, args[k]) for k, v in checks.items()):
                continue
            if "minStudyDate" in args and not (
                args["minStudyDate"] <= first.study_date <= args["maxStudyDate"]
            ):
                continue
            selected.append(members)
        return selected

    def __call__(self, request: Request) -> Response:
        args = dict(request.args)
        self.requests.append(args)
        level = args.get("QueryLevel", "STUDY")
        studies = self.studies(args)
        if "limit" in args:
            start = int(args.get("offset", 0)) if self.honour_offset else 0
            studies = studies[start : start + int(args["limit"])]
        body = [
            f'<?xml version="1.0" encoding="UTF-8"?><studySearchResults xmlns="{NS}" '
            f'queryLevel="{level}">'
        ]
        for members in studies:
            body.append(
                f'<study studyUUID="{uuid.uuid5(uuid.NAMESPACE_OID, members[0].study_uid)}" '
                f'version="1" lastModified="2024-08-09T06:42:04.325Z">'
            )
            if level in ("SERIES", "INSTANCE"):
                series_uids = list(dict.fromkeys(m.series_uid for m in members))
                for series_uid in series_uids:
                    in_series = [m for m in members if m.series_uid == series_uid]
                    body.append("<series>")
                    if level == "INSTANCE":
                        for inst in in_series:
                            body.append(
                                "<instance>"
                                + _attr("00080018", "UI", inst.sop_uid)
                                + _attr("00020010", "UI", inst.transfer_syntax)
                                + _attr("00200013", "IS", inst.instance_number)
                                + "</instance>"
                            )
                    body.append(
                        _attr("0020000e", "UI", series_uid)
                        + _attr("00080060", "CS", in_series[0].modality)
                        + _attr("00200011", "IS", in_series[0].series_number)
                        + "</series>"
                    )
            body.append(_study_attrs(members[0]) + "</study>")
        body.append("</studySearchResults>")
        return Response("".join(body), content_type="text/xml;charset=UTF-8")


@pytest.fixture(scope="module")
def cohort() -> list[GeneratedInstance]:
    return standard_cohort()


@pytest.fixture()
def mint(httpserver: HTTPServer, cohort) -> tuple[Mint, MintServer]:
    server = MintServer(cohort)
    httpserver.expect_request("/mint/studies", method="GET").respond_with_handler(server)
    return Mint(httpserver.url_for("/mint")), server


def test_study_search_with_wildcard_maps_to_mint_parameters(mint) -> None:
    searcher, server = mint
    studies = searcher.search(Query(PatientID="TRL00*"))
    assert sorted(s.data.AccessionNumber for s in studies) == [
        "ACC1001",
        "ACC1002",
        "ACC1003",
        "ACC1004",
        "ACC1005",
    ]
    assert server.requests[0]["PatientID"] == "TRL00*"
    assert server.requests[0]["QueryLevel"] == "STUDY"
    assert "StudyInstanceUID" in server.requests[0]["IncludeFields"].split(",")
    first = next(s for s in studies if s.data.AccessionNumber == "ACC1001")
    assert first.uid == STUDIES["ACC1001"].study_uid
    assert str(first.data.PatientName) == "Doe^Jane"
    assert first.series is None  # a study-level search does not know the series


def test_date_range_becomes_min_and_max_study_date(mint) -> None:
    searcher, server = mint
    studies = searcher.search(Query(StudyDate="20240101-20240131"))
    assert {s.data.AccessionNumber for s in studies} == {"ACC1003", "ACC1004"}
    assert (server.requests[0]["minStudyDate"], server.requests[0]["maxStudyDate"]) == (
        "20240101",
        "20240131",
    )
    searcher.search(Query(StudyDate="20241101-"))
    assert server.requests[1]["maxStudyDate"] == "99991231"


def test_series_level_filters_locally_with_dicom_matching(mint) -> None:
    searcher, server = mint
    studies = searcher.search(
        Query(query_level=QueryLevel.SERIES, Modality="MR", PatientID="TRL002")
    )
    assert server.requests[-1]["QueryLevel"] == "SERIES"
    assert "Modality" not in server.requests[-1]  # not a MINT parameter: matched here
    assert [s.data.AccessionNumber for s in studies] == ["ACC1003"]
    (series,) = studies[0].all_series()
    assert series.uid == STUDIES["ACC1003"].series_uid(1)
    assert series.data.Modality == "MR"


def test_study_level_query_on_a_series_attribute_searches_series_then_collapses(mint) -> None:
    searcher, server = mint
    studies = searcher.search(Query(Modality="OT"))
    assert server.requests[-1]["QueryLevel"] == "SERIES"
    assert [s.data.AccessionNumber for s in studies] == ["ACC1004"]
    assert studies[0].series is None


def test_instance_level_gives_full_trees(mint, cohort) -> None:
    searcher, _ = mint
    spec = STUDIES["ACC1002"]
    (study,) = searcher.search(
        Query(query_level=QueryLevel.INSTANCE, StudyInstanceUID=spec.study_uid)
    )
    expected = {i.sop_uid for i in cohort if i.study_uid == spec.study_uid}
    assert {i.uid for i in study.all_instances()} == expected
    rle = [i for i in study.all_instances() if i.series_uid == spec.series_uid(1)]
    assert all(i.data.TransferSyntaxUID == "1.2.840.10008.1.2.5" for i in rle)


def test_uid_list_is_one_request_per_uid(mint) -> None:
    searcher, server = mint
    uids = [STUDIES["ACC1001"].study_uid, STUDIES["ACC1005"].study_uid]
    studies = searcher.search(Query(StudyInstanceUID=uids))
    assert {s.uid for s in studies} == set(uids)
    assert [r["StudyInstanceUID"] for r in server.requests] == uids


def test_limit_and_offset_apply_to_matches(mint) -> None:
    searcher, _ = mint
    every = [s.uid for s in searcher.search(Query(PatientID="TRL*"))]
    window = [s.uid for s in searcher.search(Query(PatientID="TRL*", limit=2, offset=1))]
    assert window == every[1:3]


def test_paging_with_limit_and_offset(httpserver: HTTPServer, cohort) -> None:
    server = MintServer(cohort)
    httpserver.expect_request("/mint/studies").respond_with_handler(server)
    studies = Mint(httpserver.url_for("/mint"), page_size=2).search(Query())
    assert len(studies) == 6
    assert [r["offset"] for r in server.requests] == ["0", "2", "4", "6"]


def test_server_ignoring_offset_is_reported_not_looped(httpserver: HTTPServer, cohort) -> None:
    server = MintServer(cohort, honour_offset=False)
    httpserver.expect_request("/mint/studies").respond_with_handler(server)
    with pytest.raises(ResponseFormatError, match="ignores 'offset'"):
        Mint(httpserver.url_for("/mint"), page_size=2).search(Query())


def test_empty_result(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/mint/studies").respond_with_data(
        f'<?xml version="1.0" encoding="UTF-8"?><studySearchResults xmlns="{NS}" '
        'queryfields="PatientID=NOBODY" includefields="StudyInstanceUID"/>',
        content_type="text/xml",
    )
    assert Mint(httpserver.url_for("/mint")).search(Query(PatientID="NOBODY")) == []


def test_server_error_names_url_status_and_message(httpserver: HTTPServer) -> None:
    page = (
        "<html><head><title>Error 500 Request failed.</title></head><body><h2>HTTP ERROR 500"
        "</h2><p>Problem accessing /mint/studies. Reason:<pre>    Request failed.</pre></p>"
        "</body></html>"
    )
    httpserver.expect_request("/mint/studies").respond_with_data(page, status=500)
    with pytest.raises(BackendError) as raised:
        Mint(httpserver.url_for("/mint")).search(Query(PatientID="X"))
    assert raised.value.status == 500
    assert "/mint/studies" in str(raised.value) and "Request failed" in str(raised.value)


def test_unauthorised(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/mint/studies").respond_with_data("log in first", status=401)
    with pytest.raises(AuthenticationError):
        Mint(httpserver.url_for("/mint"), auth=("u", "p")).search(Query())


@pytest.mark.parametrize(
    "body, problem",
    [
        ("<studySearchResults", "not well-formed"),
        ("<html><body>maintenance</body></html>", "expected <studySearchResults>"),
        (
            '<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><studySearchResults/>',
            "DTD",
        ),
    ],
)
def test_malformed_answers(httpserver: HTTPServer, body: str, problem: str) -> None:
    httpserver.expect_request("/mint/studies").respond_with_data(body, content_type="text/xml")
    with pytest.raises(ResponseFormatError, match=problem):
        Mint(httpserver.url_for("/mint")).search(Query())


def test_mint_searcher_feeds_a_trolley(mint, cohort, tmp_path) -> None:
    """MINT finds the study; the Trolley asks it for instances; a local folder delivers them."""
    searcher, _ = mint
    source = tmp_path / "source"
    source.mkdir()
    for inst in cohort:
        (source / f"{inst.sop_uid}.bin").write_bytes(inst.data)
    trolley = Trolley(searcher=searcher, downloader=LocalFolder(source))
    study = trolley.find_study(Query(AccessionNumber="ACC1003"))
    stored = trolley.download(study, tmp_path / "out")
    expected = {i.sop_uid: i.data for i in cohort if i.accession_number == "ACC1003"}
    assert {s.sop_instance_uid for s in stored} == set(expected)
    for item in stored:
        assert item.path.read_bytes() == expected[item.sop_instance_uid]
