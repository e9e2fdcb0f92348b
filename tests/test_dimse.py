"""C-FIND, C-GET and C-MOVE against two real archives: Orthanc and pynetdicom's qrscp."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt

from trolley_etl import Query, QueryLevel, StorageDir, Study, Trolley
from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, COHORT_STUDIES, GeneratedInstance
from trolley_etl._harness.orthanc import OrthancServer, free_port
from trolley_etl._harness.qrscp import QRSCPError, QRSCPServer
from trolley_etl.backends import CGet, CMove, DicomQR, WadoRS
from trolley_etl.backends.dicom_qr import identifiers_for
from trolley_etl.backends.dimse import status_meaning, storage_contexts
from trolley_etl.core.errors import (
    AssociationRejectedError,
    ConnectionFailedError,
    DimseStatusError,
    IncompleteRetrievalError,
    ObjectNotFoundError,
    StorageError,
)
from trolley_etl.core.model import InstanceReference, SeriesReference, StudyReference

LOCAL = "127.0.0.1"
#: The move destination registered in both archives, and one that points elsewhere.
MOVE_AET = "TROLLEYMOVE"
ELSEWHERE_AET = "ELSEWHERE"


class Archive:
    """What a test needs to know about one archive."""

    def __init__(self, name: str, port: int, aet: str, move_port: int, decoy_port: int) -> None:
        self.name = name
        self.dimse = {"host": LOCAL, "port": port, "called_aet": aet, "calling_aet": "TROLLEY"}
        self.move_port = move_port
        self.decoy_port = decoy_port

    def cmove(self, **kwargs: object) -> CMove:
        dest = {"aet": MOVE_AET, "port": self.move_port, "bind": LOCAL}
        return CMove(**self.dimse, move_destination=dest, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def orthanc_archive(orthanc: OrthancServer) -> Archive:
    archive = Archive("orthanc", orthanc.dicom_port, orthanc.aet, free_port(), free_port())
    orthanc.add_modality(MOVE_AET, MOVE_AET, LOCAL, archive.move_port)
    orthanc.add_modality(ELSEWHERE_AET, ELSEWHERE_AET, LOCAL, archive.decoy_port)
    return archive


@pytest.fixture(scope="module")
def qrscp_archive(
    tmp_path_factory: pytest.TempPathFactory, cohort: list[GeneratedInstance]
) -> Iterator[Archive]:
    move_port, decoy_port = free_port(), free_port()
    server = QRSCPServer(
        tmp_path_factory.mktemp("qrscp"),
        destinations={MOVE_AET: (LOCAL, move_port), ELSEWHERE_AET: (LOCAL, decoy_port)},
    )
    try:
        server.start()
        server.store(inst.data for inst in cohort)
    except QRSCPError as exc:
        server.stop()
        pytest.fail(str(exc), pytrace=False)
    try:
        yield Archive("qrscp", server.port, server.aet, move_port, decoy_port)
    finally:
        server.stop()


@pytest.fixture(params=["orthanc", "qrscp"])
def archive(request: pytest.FixtureRequest) -> Archive:
    return request.getfixturevalue(f"{request.param}_archive")


def accessions(studies: list[Study]) -> set[str]:
    return {str(s.data.get("AccessionNumber", "")) for s in studies}


def part10_split(data: bytes) -> tuple[Dataset, bytes]:
    """(file meta, the data set bytes after it) of a Part 10 file."""
    meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
    (group_length,) = struct.unpack("<I", data[140:144])
    return meta, data[144 + group_length :]


def files_under(root: Path) -> dict[str, bytes]:
    files = {}
    for path in root.rglob("*.dcm"):
        if ".trolley" not in path.parts:
            data = path.read_bytes()
            files[
                str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
            ] = data
    return files


# --- C-FIND -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"PatientID": "TRL001"}, {"ACC1001", "ACC1002"}),
        ({"PatientID": "TRL00*"}, {"ACC1001", "ACC1002", "ACC1003", "ACC1004", "ACC1005"}),
        ({"PatientID": "TRL00?"}, {"ACC1001", "ACC1002", "ACC1003", "ACC1004", "ACC1005"}),
        ({"PatientName": "Roe^*"}, {"ACC1003", "ACC1004"}),
        ({"StudyDate": "20240110"}, {"ACC1003"}),
        ({"StudyDate": "20240101-20240131"}, {"ACC1003", "ACC1004"}),
        ({"StudyDate": "-20231231"}, {"ACC1001", "ACC1002"}),
        ({"StudyTime": "170000-"}, {"ACC1004", "ACC1005"}),
        ({"AccessionNumber": ["ACC1001", "ACC1005"]}, {"ACC1001", "ACC1005"}),
        (
            {"StudyInstanceUID": [COHORT_ACCESSIONS[a].study_uid for a in ("ACC1002", "ACC1004")]},
            {"ACC1002", "ACC1004"},
        ),
        ({"PatientID": "NOBODY"}, set()),
    ],
)
def test_study_level_c_find(archive: Archive, filters: dict, expected: set[str]) -> None:
    # qrscp fails (0xC320) on list of UID matching: one C-FIND per UID there
    qr = DicomQR(**archive.dimse, uid_list_matching=archive.name != "qrscp")
    studies = qr.search(Query(**filters))
    assert accessions(studies) == expected
    assert len(studies) == len(expected)  # qrscp answers once per instance: rows are deduplicated
    assert all(study.series is None for study in studies)


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"ModalitiesInStudy": ["OT", "MR"]}, {"ACC1002", "ACC1003", "ACC1004", "ACC1005"}),
        ({"StudyDescription": "CT*"}, {"ACC1001", "ACC1003", "ACC1004"}),
    ],
)
def test_study_level_c_find_optional_keys_on_orthanc(
    orthanc_archive: Archive, filters: dict, expected: set[str]
) -> None:
    # qrscp supports only the required keys of PS3.4 C.6.1.1.2 and ignores these filters
    assert accessions(DicomQR(**orthanc_archive.dimse).search(Query(**filters))) == expected


def test_series_level_or_list_is_one_find_per_value(archive: Archive, cohort) -> None:
    studies = DicomQR(**archive.dimse).search(
        Query(query_level="series", Modality=["OT", "MR"], PatientID="TRL002")
    )
    found = {(s.uid, se.uid) for s in studies for se in s.all_series()}
    expected = {
        (i.study_uid, i.series_uid)
        for i in cohort
        if i.patient_id == "TRL002" and i.modality in ("OT", "MR")
    }
    assert found == expected
    assert len(expected) == 2
    assert all(se.instances is None for s in studies for se in s.all_series())
    assert accessions(studies) == {"ACC1003", "ACC1004"}  # study keys fill the Study


def test_instance_level_with_include_fields(archive: Archive, cohort) -> None:
    spec = COHORT_ACCESSIONS["ACC1001"]
    query = Query(
        query_level="instance",
        StudyInstanceUID=spec.study_uid,
        SeriesInstanceUID=spec.series_uid(1),
        include_fields=["InstanceNumber"],
    )
    study = Trolley(downloader=CGet(**archive.dimse), searcher=DicomQR(**archive.dimse)).find_study(
        query
    )
    instances = study.all_instances()
    expected = {i.sop_uid: i.instance_number for i in cohort if i.series_uid == spec.series_uid(1)}
    assert {i.uid: int(i.data.InstanceNumber) for i in instances} == expected


def test_limit_cancels_and_offset_skips(archive: Archive, cohort) -> None:
    qr = DicomQR(**archive.dimse)
    every = qr.search(Query(query_level="instance"))
    assert sum(len(s.all_instances()) for s in every) == len(cohort)
    limited = qr.search(Query(query_level="instance", limit=3))
    assert sum(len(s.all_instances()) for s in limited) == 3
    tail = qr.search(Query(query_level="instance", offset=len(cohort) - 2))
    assert sum(len(s.all_instances()) for s in tail) == 2
    # the cancelled association ended cleanly: the archive still answers
    assert len(qr.search(Query(PatientID="TRL001"))) == 2


def test_identifiers_follow_c_find_rules() -> None:
    uids = ("1.2.3", "1.2.4")
    query = Query(
        query_level="series",
        StudyInstanceUID=list(uids),
        Modality=["CT", "MR"],
        StudyDate="20240101-",
        include_fields=["BodyPartExamined"],
    )
    identifiers = identifiers_for(query)
    assert [ds.Modality for ds in identifiers] == ["CT", "MR"]  # an OR is one C-FIND per value
    for ds in identifiers:
        assert ds.QueryRetrieveLevel == "SERIES"
        assert list(ds.StudyInstanceUID) == list(uids)  # list of UID matching: backslashes
        assert ds.StudyDate == "20240101-"
        assert ds.SeriesInstanceUID == "" and ds.BodyPartExamined == ""
    assert identifiers_for(Query(query_level="instance"))[0].QueryRetrieveLevel == "IMAGE"
    split = identifiers_for(Query(StudyInstanceUID=list(uids)), uid_list_matching=False)
    assert [ds.StudyInstanceUID for ds in split] == list(uids)


# --- C-GET and C-MOVE -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wado_files(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every cohort instance as WADO-RS delivers it (the reference for content checks)."""
    root = tmp_path_factory.mktemp("wado")
    trolley = Trolley(downloader=WadoRS(orthanc.dicomweb_url))
    trolley.download([StudyReference(s.study_uid) for s in COHORT_STUDIES], output_dir=root)
    return files_under(root)


def assert_same_content(received: dict[str, bytes], reference: dict[str, bytes]) -> set[str]:
    """Data sets are byte-identical; return the file meta elements that differ."""
    differing: set[str] = set()
    for sop_uid, data in received.items():
        meta, body = part10_split(data)
        ref_meta, ref_body = part10_split(reference[sop_uid])
        assert body == ref_body, f"{sop_uid}: data set bytes differ"
        assert meta.TransferSyntaxUID == ref_meta.TransferSyntaxUID
        assert meta.MediaStorageSOPInstanceUID == ref_meta.MediaStorageSOPInstanceUID
        assert meta.MediaStorageSOPClassUID == ref_meta.MediaStorageSOPClassUID
        differing |= {
            e.keyword
            for e in meta
            if e.keyword != "FileMetaInformationGroupLength"
            and (e.tag not in ref_meta or ref_meta[e.tag].value != e.value)
        }
    return differing


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_orthanc_files_match_wado_rs(
    orthanc_archive: Archive, wado_files: dict, method: str, tmp_path: Path
) -> None:
    downloader = CGet(**orthanc_archive.dimse) if method == "c-get" else orthanc_archive.cmove()
    with Trolley(downloader=downloader, searcher=DicomQR(**orthanc_archive.dimse)) as trolley:
        studies = trolley.find_studies(Query())
        stored = trolley.download(studies, output_dir=tmp_path)
    received = files_under(tmp_path)
    assert len(stored) == len(received) == len(wado_files)
    differing = assert_same_content(received, wado_files)
    # Only the implementation that wrote the file meta differs (pynetdicom vs Orthanc), plus
    # the Source AE Title pynetdicom records.
    assert differing <= {
        "ImplementationClassUID",
        "ImplementationVersionName",
        "SourceApplicationEntityTitle",
    }
    compressed = [s for s in stored if s.transfer_syntax == "1.2.840.10008.1.2.5"]
    assert len(compressed) == 3  # the RLE series arrived as stored, not transcoded


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_qrscp_files_match_the_originals(
    qrscp_archive: Archive, cohort, method: str, tmp_path: Path
) -> None:
    downloader = CGet(**qrscp_archive.dimse) if method == "c-get" else qrscp_archive.cmove()
    with Trolley(downloader=downloader, searcher=DicomQR(**qrscp_archive.dimse)) as trolley:
        trolley.download([StudyReference(s.study_uid) for s in COHORT_STUDIES], tmp_path)
    received = files_under(tmp_path)
    assert len(received) == len(cohort)
    originals = {i.sop_uid: i.data for i in cohort}
    assert_same_content(received, originals)


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_series_and_instance_levels(archive: Archive, cohort, method: str) -> None:
    downloader = CGet(**archive.dimse) if method == "c-get" else archive.cmove()
    spec = COHORT_ACCESSIONS["ACC1003"]
    series = [i for i in cohort if i.series_uid == spec.series_uid(0)]
    one = series[1]
    with downloader:
        sink = _ListSink()
        assert downloader.fetch(SeriesReference(spec.study_uid, spec.series_uid(0)), sink) == len(
            series
        )
        assert {pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID for d in sink.items} == {
            i.sop_uid for i in series
        }
        sink = _ListSink()
        ref = InstanceReference(one.study_uid, one.series_uid, one.sop_uid)
        assert downloader.fetch(ref, sink) == 1
        assert part10_split(sink.items[0])[1] == part10_split(one.data)[1]


def test_series_only_c_move_goes_through_the_trolley_fallback(
    archive: Archive, cohort, tmp_path: Path
) -> None:
    cmove = archive.cmove(retrieval_level="series")
    assert cmove.retrieval_level is QueryLevel.SERIES
    with Trolley(downloader=cmove, searcher=DicomQR(**archive.dimse), workers=4) as trolley:
        studies = trolley.find_studies(Query(PatientID="TRL00*"))
        plan = trolley.plan(studies)
        assert plan and all(isinstance(ref, SeriesReference) for ref in plan)
        stored = trolley.download(studies, output_dir=tmp_path)
    expected = {i.sop_uid for i in cohort if i.patient_id.startswith("TRL00")}
    assert {s.sop_instance_uid for s in stored} == expected
    assert len(stored) == len(expected)
    assert cmove.unsolicited == 0  # four concurrent moves through one port, each got its own


def test_concurrent_overlapping_moves_each_get_their_objects(archive: Archive, cohort) -> None:
    spec = COHORT_ACCESSIONS["ACC1001"]
    refs = [
        StudyReference(spec.study_uid),
        SeriesReference(spec.study_uid, spec.series_uid(0)),
        SeriesReference(spec.study_uid, spec.series_uid(1)),
        StudyReference(spec.study_uid),
    ]
    sinks = [_ListSink() for _ in refs]
    counts: list[int] = [0] * len(refs)
    with archive.cmove() as cmove:

        def run(index: int) -> None:
            counts[index] = cmove.fetch(refs[index], sinks[index])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(refs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    in_study = [i for i in cohort if i.study_uid == spec.study_uid]
    expected_counts = [
        len(in_study),
        sum(i.series_uid == spec.series_uid(0) for i in in_study),
        sum(i.series_uid == spec.series_uid(1) for i in in_study),
        len(in_study),
    ]
    assert counts == expected_counts
    for ref, sink in zip(refs, sinks, strict=True):
        uids = [pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID for d in sink.items]
        assert len(uids) == len(set(uids))
        if isinstance(ref, SeriesReference):
            assert all(
                pydicom.dcmread(io.BytesIO(d)).SeriesInstanceUID == ref.series_uid
                for d in sink.items
            )


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.archive
def test_wrong_called_aet_is_rejected(tmp_path: Path) -> None:
    with OrthancServer(tmp_path, aet="STRICT", check_called_aet=True) as strict:
        dimse = {"host": LOCAL, "port": strict.dicom_port, "calling_aet": "TROLLEY"}
        with pytest.raises(AssociationRejectedError) as caught:
            DicomQR(**dimse, called_aet="WRONG").search(Query())
        message = str(caught.value)
        assert f"{LOCAL}:{strict.dicom_port}" in message
        assert "WRONG" in message and "TROLLEY" in message and "rejected" in message
        with pytest.raises(AssociationRejectedError):
            CGet(**dimse, called_aet="WRONG").fetch(StudyReference("1.2.3"), _ListSink())
        assert DicomQR(**dimse, called_aet="STRICT").search(Query()) == []  # the right one works


def test_unknown_move_destination(archive: Archive, cohort) -> None:
    dest = {"aet": "NOSUCHDEST", "port": free_port(), "bind": LOCAL}
    cmove = CMove(**archive.dimse, move_destination=dest)  # type: ignore[arg-type]
    with cmove, pytest.raises(DimseStatusError) as caught:
        cmove.fetch(StudyReference(cohort[0].study_uid), _ListSink())
    message = str(caught.value)
    assert "0x" in message and "NOSUCHDEST" in message and "move destination" in message
    # Orthanc 1.10 answers 0xC000 (Unable to process), qrscp the standard 0xA801
    assert caught.value.status == (0xA801 if archive.name == "qrscp" else 0xC000)


def test_objects_sent_elsewhere_are_a_shortfall(archive: Archive, cohort) -> None:
    """The archive knows our AE title with the wrong port: it reports success, we got nothing."""
    decoy = AE(ae_title=ELSEWHERE_AET)
    for context in AllStoragePresentationContexts:
        decoy.add_supported_context(
            context.abstract_syntax,
            ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5"],
        )
    server = decoy.start_server(
        (LOCAL, archive.decoy_port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0)]
    )
    try:
        dest = {"aet": ELSEWHERE_AET, "port": free_port(), "bind": LOCAL}
        spec = COHORT_ACCESSIONS["ACC1005"]
        ref = SeriesReference(spec.study_uid, spec.series_uid(0))
        cmove = CMove(**archive.dimse, move_destination=dest, arrival_grace=0.3)  # type: ignore[arg-type]
        with cmove, pytest.raises(IncompleteRetrievalError) as caught:
            cmove.fetch(ref, _ListSink())
    finally:
        server.shutdown()
    expected = sum(1 for i in cohort if i.series_uid == spec.series_uid(0))
    assert caught.value.missing == expected
    assert f"{expected} missing" in str(caught.value)


def test_storage_failure_is_reported(orthanc_archive: Archive, cohort) -> None:
    spec = COHORT_ACCESSIONS["ACC1001"]
    with pytest.raises(StorageError) as caught:
        CGet(**orthanc_archive.dimse).fetch(StudyReference(spec.study_uid), _FailingSink())
    assert "could not be stored" in str(caught.value) and "disk full" in str(caught.value)


def test_unknown_study_is_not_found(archive: Archive) -> None:
    with pytest.raises((ObjectNotFoundError, DimseStatusError)):
        CGet(**archive.dimse).fetch(StudyReference("1.2.3.4.5.6"), _ListSink())


@pytest.mark.archive
def test_silent_archive_times_out_quickly() -> None:
    listener = socket.socket()
    listener.bind((LOCAL, 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(ConnectionFailedError) as caught:
            DicomQR(LOCAL, port, "PACS", acse_timeout=1).search(Query())
        assert time.monotonic() - started < 5
        assert "ACSE timeout" in str(caught.value) and f"{LOCAL}:{port}" in str(caught.value)
    finally:
        listener.close()


def test_refused_connection_names_the_address() -> None:
    port = free_port()
    with pytest.raises(ConnectionFailedError) as caught:
        CGet(LOCAL, port, "PACS").fetch(StudyReference("1.2.3"), _ListSink())
    assert f"{LOCAL}:{port}" in str(caught.value) and "cannot connect" in str(caught.value)


def test_status_meanings_and_contexts() -> None:
    assert status_meaning(0xA801, "C-MOVE") == "0xA801 (Failure: Move destination unknown)"
    assert "Sub-operations" in status_meaning(0xB000, "C-GET")
    contexts = storage_contexts()
    assert len(contexts) == 127  # plus the Query/Retrieve context: the 128 maximum
    with pytest.raises(ValueError):
        CMove(LOCAL, 104, "PACS", move_destination={"aet": "X"})
    with pytest.raises(ValueError):
        DicomQR(LOCAL, 104, "A_TITLE_LONGER_THAN_16")


# --- sinks ----------------------------------------------------------------------------------------


class _ListWriter:
    def __init__(self, sink: _ListSink) -> None:
        self.sink = sink
        self.buffer = io.BytesIO()

    def write(self, chunk: bytes) -> None:
        self.buffer.write(chunk)

    def commit(self) -> None:
        with self.sink.lock:
            self.sink.items.append(self.buffer.getvalue())

    def abort(self) -> None:
        self.buffer = io.BytesIO()


class _ListSink:
    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.lock = threading.Lock()

    def open_instance(self) -> _ListWriter:
        return _ListWriter(self)


class _FailingWriter(_ListWriter):
    def commit(self) -> None:
        raise StorageError("disk full")


class _FailingSink(_ListSink):
    def open_instance(self) -> _ListWriter:
        return _FailingWriter(self)


def test_storage_dir_is_a_sink(orthanc_archive: Archive, tmp_path: Path) -> None:
    spec = COHORT_ACCESSIONS["ACC1004"]
    count = CGet(**orthanc_archive.dimse).fetch(
        StudyReference(spec.study_uid), StorageDir(tmp_path)
    )
    assert count == len(files_under(tmp_path)) == 5
