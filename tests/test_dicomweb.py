"""QIDO-RS, WADO-RS and WADO-URI against a real Orthanc, through the Trolley."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from trolley_etl import Query, QueryLevel, StorageDir, Study, Trolley
from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, COHORT_STUDIES, HOSTILE_ACCESSION
from trolley_etl._harness.orthanc import free_port
from trolley_etl.backends import QidoRS, WadoRS, WadoURI
from trolley_etl.core.backend import Searcher
from trolley_etl.core.errors import (
    AuthenticationError,
    ConnectionFailedError,
    DownloadError,
    NoMatchError,
    ObjectNotFoundError,
    SeveralMatchesError,
)
from trolley_etl.core.model import InstanceReference, SeriesReference, StudyReference


def accessions(studies: list[Study]) -> set[str]:
    return {str(s.data.get("AccessionNumber", "")) for s in studies}


@pytest.fixture(scope="module")
def qido(orthanc) -> QidoRS:
    return QidoRS(orthanc.dicomweb_url)


@pytest.fixture(scope="module")
def trolley(orthanc, qido) -> Trolley:
    return Trolley(searcher=qido, downloader=WadoRS(orthanc.dicomweb_url))


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if ".trolley" not in p.parts)


# --- search -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, {s.accession_number for s in COHORT_STUDIES}),
        ({"PatientID": "TRL001"}, {"ACC1001", "ACC1002"}),
        ({"PatientID": "TRL00*"}, {"ACC1001", "ACC1002", "ACC1003", "ACC1004", "ACC1005"}),
        ({"PatientID": "TRL00?"}, {"ACC1001", "ACC1002", "ACC1003", "ACC1004", "ACC1005"}),
        ({"PatientName": "*passwd*"}, {HOSTILE_ACCESSION}),
        # Orthanc 1.10 compares query values without percent-decoding them, and HTTP clients
        # must encode `^` and spaces, so PN tests use values without them.
        ({"PatientName": "Roe*"}, {"ACC1003", "ACC1004"}),
        ({"StudyDate": "20240110"}, {"ACC1003"}),
        ({"StudyDate": "20240101-20240131"}, {"ACC1003", "ACC1004"}),
        ({"StudyDate": "20240701-"}, {"ACC1005", HOSTILE_ACCESSION}),
        ({"StudyDate": "-20231231"}, {"ACC1001", "ACC1002"}),
        ({"StudyTime": "080000-100000"}, {"ACC1001", "ACC1003"}),
        ({"StudyTime": "170000-"}, {"ACC1004", "ACC1005"}),
        ({"ModalitiesInStudy": "MR"}, {"ACC1002", "ACC1003", "ACC1005"}),
        ({"ModalitiesInStudy": ["OT", "MR"]}, {"ACC1002", "ACC1003", "ACC1004", "ACC1005"}),
        ({"AccessionNumber": ["ACC1001", "ACC1005"]}, {"ACC1001", "ACC1005"}),
        ({"StudyDescription": "CT*"}, {"ACC1001", "ACC1003", "ACC1004"}),
        (
            {"StudyInstanceUID": [COHORT_ACCESSIONS[a].study_uid for a in ("ACC1002", "ACC1004")]},
            {"ACC1002", "ACC1004"},
        ),
        ({"PatientID": "NOBODY"}, set()),
    ],
)
def test_study_filters(trolley: Trolley, filters: dict, expected: set[str]) -> None:
    studies = trolley.find_studies(Query(**filters))
    assert accessions(studies) == expected
    assert len(studies) == len(expected)
    assert all(study.series is None for study in studies)  # study level: series not searched


def test_series_level_filters(trolley: Trolley) -> None:
    studies = trolley.find_studies(Query(query_level=QueryLevel.SERIES, Modality=["MR", "OT"]))
    assert accessions(studies) == {"ACC1002", "ACC1003", "ACC1004", "ACC1005"}
    modalities = {str(s.data.Modality) for study in studies for s in study.all_series()}
    assert modalities == {"MR", "OT"}
    assert sum(len(study.all_series()) for study in studies) == 6
    mixed = next(s for s in studies if s.uid == COHORT_ACCESSIONS["ACC1003"].study_uid)
    assert [s.uid for s in mixed.all_series()] == [COHORT_ACCESSIONS["ACC1003"].series_uid(1)]


def test_instance_level_and_include_fields(trolley: Trolley) -> None:
    spec = COHORT_ACCESSIONS["ACC1004"]
    query = Query(
        query_level="instance",
        StudyInstanceUID=spec.study_uid,
        SeriesInstanceUID=spec.series_uid(0),
        include_fields=["NumberOfFrames", "Rows"],
    )
    (study,) = trolley.find_studies(query)
    instances = study.all_instances()
    assert len(instances) == spec.series[0].count
    assert {i.series_uid for i in instances} == {spec.series_uid(0)}
    assert all(int(i.data.Rows) == 64 for i in instances)


def test_instance_level_without_uids_spans_studies(trolley: Trolley, cohort) -> None:
    studies = trolley.find_studies(Query(query_level="instance", PatientID="TRL001"))
    found = {i.uid for s in studies for i in s.all_instances()}
    assert found == {c.sop_uid for c in cohort if c.patient_id == "TRL001"}


def test_limit_and_offset(trolley: Trolley) -> None:
    everything = trolley.find_studies(Query())
    assert len(trolley.find_studies(Query(limit=2))) == 2
    rest = trolley.find_studies(Query(offset=4))
    assert [s.uid for s in rest] == [s.uid for s in everything[4:]]


def test_find_study_exactly_one(trolley: Trolley) -> None:
    study = trolley.find_study(Query(AccessionNumber="ACC1003"))
    assert study.uid == COHORT_ACCESSIONS["ACC1003"].study_uid
    with pytest.raises(NoMatchError, match="found 0"):
        trolley.find_study(Query(AccessionNumber="NOPE"))
    with pytest.raises(SeveralMatchesError, match="found 2"):
        trolley.find_study(Query(PatientID="TRL001"))


def test_find_study_by_id_at_each_level(trolley: Trolley) -> None:
    spec = COHORT_ACCESSIONS["ACC1001"]
    assert trolley.find_study_by_id(spec.study_uid).series is None
    by_series = trolley.find_study_by_id(spec.study_uid, QueryLevel.SERIES)
    assert {s.uid for s in by_series.all_series()} == {spec.series_uid(0), spec.series_uid(1)}
    by_instance = trolley.find_study_by_id(spec.study_uid, QueryLevel.INSTANCE)
    assert len(by_instance.all_instances()) == spec.instance_count


# --- WADO-RS download -------------------------------------------------------------------------


def test_wado_rs_study_download_is_byte_identical(
    trolley: Trolley, orthanc, cohort, tmp_path
) -> None:
    studies = trolley.find_studies(Query(PatientID="TRL001"))
    stored = trolley.download(studies, output_dir=tmp_path)
    expected = {c.sop_uid: c for c in cohort if c.patient_id == "TRL001"}
    assert {s.sop_instance_uid for s in stored} == set(expected)
    assert len(files_under(tmp_path)) == len(expected)
    for item in stored:
        source = expected[item.sop_instance_uid]
        assert item.relative_path == Path(
            source.study_uid, source.series_uid, f"{source.sop_uid}.dcm"
        )
        assert item.path.read_bytes() == orthanc.instance_file(
            source.study_uid, source.series_uid, source.sop_uid
        )
    # the RLE series stays RLE, the private tags stay
    rle = next(c for c in expected.values() if c.compressed)
    ds = pydicom.dcmread(tmp_path / rle.study_uid / rle.series_uid / f"{rle.sop_uid}.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    private = next(c for c in expected.values() if c.private)
    ds = pydicom.dcmread(
        tmp_path / private.study_uid / private.series_uid / f"{private.sop_uid}.dcm"
    )
    assert ds.private_block(0x0011, "TROLLEY TEST")[0x01].value == "trolley private value"
    original = pydicom.dcmread(io.BytesIO(private.data))
    assert ds.PixelData == original.PixelData


def test_wado_rs_series_and_instance_download(trolley: Trolley, cohort, tmp_path) -> None:
    spec = COHORT_ACCESSIONS["ACC1004"]
    multiframe = next(c for c in cohort if c.frames > 1)
    stored = trolley.download(
        [
            SeriesReference(spec.study_uid, spec.series_uid(0)),
            InstanceReference(multiframe.study_uid, multiframe.series_uid, multiframe.sop_uid),
        ],
        output_dir=tmp_path,
    )
    assert len(stored) == spec.series[0].count + 1
    ds = pydicom.dcmread(next(s.path for s in stored if s.sop_instance_uid == multiframe.sop_uid))
    assert int(ds.NumberOfFrames) == multiframe.frames
    assert ds.pixel_array.shape[0] == multiframe.frames


def test_download_into_the_trolley_storage_with_a_layout(orthanc, qido, tmp_path) -> None:
    storage = StorageDir(tmp_path, "{PatientID}/{StudyDate}/{Modality}/{SOPInstanceUID}.dcm")
    trolley = Trolley(searcher=qido, downloader=WadoRS(orthanc.dicomweb_url), storage=storage)
    stored = trolley.download(trolley.find_study(Query(AccessionNumber="ACC1003")))
    assert {s.relative_path.parts[:3] for s in stored} == {
        ("TRL002", "20240110", "CT"),
        ("TRL002", "20240110", "MR"),
    }


def test_hostile_values_stay_inside_the_root(trolley: Trolley, cohort, tmp_path) -> None:
    root = tmp_path / "root"
    layout = (
        "{PatientID}/{PatientName}/{AccessionNumber}/{StudyDescription}/{SeriesDescription}"
        "/{SOPInstanceUID}.dcm"
    )
    trolley_with_layout = Trolley(
        searcher=trolley.searcher, downloader=trolley.downloader, storage=StorageDir(root, layout)
    )
    study = trolley_with_layout.find_study(Query(AccessionNumber=HOSTILE_ACCESSION))
    stored = trolley_with_layout.download(study)
    assert len(stored) == COHORT_ACCESSIONS[HOSTILE_ACCESSION].instance_count
    assert list(tmp_path.iterdir()) == [root]
    for item in stored:
        assert item.path.resolve().is_relative_to(root.resolve())
        assert all(p not in ("", ".", "..") for p in item.relative_path.parts)
        assert all(ord(ch) >= 32 for ch in str(item.relative_path))
        assert len(item.relative_path.parts) == 6


def test_fetch_all_datasets_streams_pydicom_datasets(trolley: Trolley, cohort) -> None:
    spec = COHORT_ACCESSIONS["ACC1002"]
    datasets = list(trolley.fetch_all_datasets(StudyReference(spec.study_uid)))
    assert sorted(str(ds.SOPInstanceUID) for ds in datasets) == sorted(
        c.sop_uid for c in cohort if c.study_uid == spec.study_uid
    )
    # leaving early stops the background retrieval cleanly
    iterator = trolley.fetch_all_datasets([StudyReference(s.study_uid) for s in COHORT_STUDIES])
    first = next(iterator)
    iterator.close()
    assert first.SOPInstanceUID


def test_wado_rs_metadata_expands_without_a_searcher(orthanc) -> None:
    spec = COHORT_ACCESSIONS["ACC1001"]
    trolley = Trolley(downloader=WadoRS(orthanc.dicomweb_url))
    (study,) = trolley.ensure_level([StudyReference(spec.study_uid)], QueryLevel.INSTANCE)
    assert isinstance(study, Study)
    assert len(study.all_instances()) == spec.instance_count
    assert {s.uid for s in study.all_series()} == {spec.series_uid(0), spec.series_uid(1)}


# --- WADO-URI and the instance fallback -------------------------------------------------------


class CountingSearcher(Searcher):
    """A real QidoRS that records the queries the Trolley makes."""

    def __init__(self, inner: QidoRS) -> None:
        self.inner = inner
        self.queries: list[Query] = []

    def search(self, query: Query) -> list[Study]:
        self.queries.append(query)
        return self.inner.search(query)


def test_wado_uri_goes_through_the_instance_fallback(orthanc, qido, cohort, tmp_path) -> None:
    searcher = CountingSearcher(qido)
    trolley = Trolley(searcher=searcher, downloader=WadoURI(orthanc.wado_uri_url))
    known = trolley.find_study_by_id(COHORT_ACCESSIONS["ACC1001"].study_uid, QueryLevel.INSTANCE)
    lacking = StudyReference(COHORT_ACCESSIONS["ACC1005"].study_uid)
    searcher.queries.clear()
    stored = trolley.download([known, lacking], output_dir=tmp_path)
    # only the object without instances was searched, at instance level
    assert [(q.query_level, q.filters) for q in searcher.queries] == [
        (QueryLevel.INSTANCE, {"StudyInstanceUID": lacking.study_uid})
    ]
    expected = {c.sop_uid: c.data for c in cohort if c.accession_number in ("ACC1001", "ACC1005")}
    assert {s.sop_instance_uid for s in stored} == set(expected)
    for item in stored:
        assert item.path.read_bytes() == expected[item.sop_instance_uid]


def test_wado_uri_series_selection_is_kept(orthanc, qido, tmp_path) -> None:
    trolley = Trolley(searcher=qido, downloader=WadoURI(orthanc.wado_uri_url))
    spec = COHORT_ACCESSIONS["ACC1003"]
    (study,) = trolley.find_studies(
        Query(query_level="series", StudyInstanceUID=spec.study_uid, Modality="MR")
    )
    stored = trolley.download(study, output_dir=tmp_path)
    assert len(stored) == spec.series[1].count
    assert {s.series_uid for s in stored} == {spec.series_uid(1)}


def test_wado_uri_without_a_searcher_is_a_clear_error(orthanc, tmp_path) -> None:
    trolley = Trolley(downloader=WadoURI(orthanc.wado_uri_url))
    with pytest.raises(
        DownloadError, match="needs instance-level references and there is no searcher"
    ):
        trolley.download(StudyReference(COHORT_STUDIES[0].study_uid), output_dir=tmp_path)


# --- failures ---------------------------------------------------------------------------------


def test_unreachable_server_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(ConnectionFailedError) as info:
        QidoRS(url, timeout=5).search(Query())
    assert url in str(info.value)
    assert "Connection refused" in str(info.value)


def test_unknown_study_is_a_404_error(trolley: Trolley, orthanc, tmp_path) -> None:
    missing = StudyReference("1.2.3.4.5.6.7.8.9")
    with pytest.raises(DownloadError) as info:
        trolley.download(missing, output_dir=tmp_path)
    ((ref, error),) = info.value.failures
    assert ref == missing
    assert isinstance(error, ObjectNotFoundError)
    assert error.status == 404
    assert f"{orthanc.dicomweb_url}/studies/1.2.3.4.5.6.7.8.9" in str(error)
    assert files_under(tmp_path) == []


def test_bad_credentials_are_refused_clearly(orthanc_auth) -> None:
    bad = QidoRS(orthanc_auth.dicomweb_url, auth=("alice", "wrong-password"))
    with pytest.raises(AuthenticationError) as info:
        bad.search(Query())
    assert info.value.status == 401
    assert orthanc_auth.dicomweb_url in str(info.value)
    assert "wrong-password" not in str(info.value)
    with pytest.raises(AuthenticationError):
        QidoRS(orthanc_auth.dicomweb_url).search(Query())


def test_good_credentials_search_and_download(orthanc_auth, tmp_path) -> None:
    user, password = orthanc_auth.auth
    trolley = Trolley(
        searcher=QidoRS(orthanc_auth.dicomweb_url, auth=(user, password)),
        downloader=WadoRS(orthanc_auth.dicomweb_url, auth=(user, password)),
    )
    studies = trolley.find_studies(Query())
    assert len(studies) == 1
    assert len(trolley.download(studies, output_dir=tmp_path)) == COHORT_STUDIES[0].instance_count
