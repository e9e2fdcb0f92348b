"""Several requests in flight within one unit, associations kept open (issue 17), and never
more than the caps.

WADO-URI fetches the instances of a series unit with parallel requests; C-GET keeps its
associations open from one retrieval to the next. Proxies between trolley-etl and a real
Orthanc count the connections and time every request.
"""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import evt
from pytest_httpserver import HTTPServer

from trolley_etl import Trolley
from trolley_etl._harness.dicomgen import (
    COHORT_ACCESSIONS,
    GeneratedInstance,
    make_instance,
    test_uid,
)
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl._harness.proxy import CountingTcpProxy, FaultProxy
from trolley_etl.backends import CGet, QidoRS, WadoURI
from trolley_etl.backends.dimse import AssociationPool, StoreReceiver
from trolley_etl.backends.limits import BackendLimits
from trolley_etl.cli.main import main
from trolley_etl.core.errors import DownloadError, ObjectNotFoundError, UnexpectedInstanceError
from trolley_etl.core.model import (
    InstanceReference,
    SeriesInstances,
    SeriesReference,
    StudyReference,
)

DELAY = 0.3  # seconds the proxy holds every answer: requests in flight overlap visibly


def series_instances(cohort: list[GeneratedInstance], accession: str, index: int) -> list[str]:
    spec = COHORT_ACCESSIONS[accession]
    return [c.sop_uid for c in cohort if c.series_uid == spec.series_uid(index)]


def overlapping(starts: list[float], within: float) -> int:
    """How many requests started less than `within` seconds after the one before."""
    times = sorted(starts)
    return sum(1 for a, b in itertools.pairwise(times) if b - a < within)


def test_wado_uri_keeps_several_requests_in_flight_within_one_unit_and_the_cap(
    orthanc: OrthancServer, cohort: list[GeneratedInstance], tmp_path: Path
) -> None:
    """One worker, one series of 4 instances, max_connections 2: two requests at a time."""
    http = FaultProxy(orthanc.url)
    http.delay = DELAY
    tcp = CountingTcpProxy(int(http.url.rsplit(":", 1)[1]))
    spec = COHORT_ACCESSIONS["ACC1001"]
    series = SeriesReference(spec.study_uid, spec.series_uid(0))
    try:
        downloader = WadoURI(
            f"http://127.0.0.1:{tcp.port}/wado", limits=BackendLimits(max_connections=2)
        )
        trolley = Trolley(searcher=QidoRS(orthanc.dicomweb_url), downloader=downloader, workers=1)
        (unit,) = trolley.plan([series])
        stored = trolley.download([series], output_dir=tmp_path)
    finally:
        tcp.close()
        http.close()
    wanted = series_instances(cohort, "ACC1001", 0)
    assert len(wanted) == 4
    assert isinstance(unit, SeriesInstances) and set(unit.instance_uids) == set(wanted)
    assert {s.sop_instance_uid for s in stored} == set(wanted)
    assert len(http.started) == 4
    assert tcp.max_open(grace=0.05) == 2  # both connections used, never a third
    assert overlapping(http.started, DELAY / 2) >= 2  # two pairs started together
    by_uid = {c.sop_uid: c.data for c in cohort}
    for item in stored:  # each object is the one its request named, byte for byte
        assert item.path.read_bytes() == by_uid[item.sop_instance_uid]


def test_wado_uri_unit_goes_on_past_a_missing_instance_and_names_it(
    orthanc: OrthancServer, cohort: list[GeneratedInstance], tmp_path: Path
) -> None:
    spec = COHORT_ACCESSIONS["ACC1001"]
    wanted = series_instances(cohort, "ACC1001", 0)
    lost = wanted[1]
    http = FaultProxy(orthanc.url)
    http.fail_next(1, 404, prefix=_wado_path(spec.study_uid, spec.series_uid(0), lost))
    try:
        unit = SeriesInstances(spec.study_uid, spec.series_uid(0), tuple(wanted))
        with pytest.raises(DownloadError) as info:
            Trolley(downloader=WadoURI(http.url + "/wado")).download([unit], output_dir=tmp_path)
    finally:
        http.close()
    ((ref, error),) = info.value.failures
    assert ref == unit
    assert isinstance(error, ObjectNotFoundError)
    assert lost in str(error) and "1 of 4" in str(error)
    assert {s.sop_instance_uid for s in info.value.stored} == set(wanted) - {lost}


def test_wado_uri_plans_one_unit_per_series_and_keeps_a_lone_instance() -> None:
    downloader = WadoURI("http://127.0.0.1:9/wado")
    refs = [
        InstanceReference("1.2", "1.2.3", "1.2.3.1"),
        InstanceReference("1.2", "1.2.4", "1.2.4.1"),
        InstanceReference("1.2", "1.2.3", "1.2.3.2"),
        InstanceReference("1.2", "1.2.3", "1.2.3.1"),
    ]
    assert downloader.plan(refs) == [
        SeriesInstances("1.2", "1.2.3", ("1.2.3.1", "1.2.3.2")),
        InstanceReference("1.2", "1.2.4", "1.2.4.1"),
    ]


def test_a_rerun_asks_only_for_the_instances_a_series_unit_lacks(
    orthanc: OrthancServer, cohort: list[GeneratedInstance], tmp_path: Path
) -> None:
    """The first run loses one instance (404: the unit fails, exit 1); the rerun requests
    that one instance only, not the series again."""
    spec = COHORT_ACCESSIONS["ACC1001"]
    wanted = series_instances(cohort, "ACC1001", 0)
    http = FaultProxy(orthanc.url)
    http.fail_next(1, 404, prefix=_wado_path(spec.study_uid, spec.series_uid(0), wanted[2]))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"""\
version: 1
name: rerun
source:
  search: {{backend: qido-rs, url: "{orthanc.dicomweb_url}"}}
  download: {{backend: wado-uri, url: "{http.url}/wado"}}
queries:
  - name: one
    filters: {{AccessionNumber: ACC1001}}
storage:
  root: ./data
run:
  workers: 2
  retries: 0
"""
    )
    try:
        assert main(["run", str(manifest), "-q"]) == 1
        first = [path for path, _ in http.requests]
        http.requests.clear()
        assert main(["run", str(manifest), "-q"]) == 0
        second = [path for path, _ in http.requests]
    finally:
        http.close()
    total = COHORT_ACCESSIONS["ACC1001"].instance_count
    assert len(first) == total
    assert second == [_wado_path(spec.study_uid, spec.series_uid(0), wanted[2])]
    stored = {p.stem for p in (tmp_path / "data").rglob("*.dcm")}
    assert stored == {c.sop_uid for c in cohort if c.study_uid == spec.study_uid}
    assert main(["status", str(manifest), "--format", "json"]) == 0


def _wado_path(study: str, series: str, sop: str) -> str:
    return (
        f"/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}"
        "&contentType=application/dicom"
    )


def test_wado_uri_batch_checks_each_object_against_its_own_instance(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    """A server answering every request with the same object: within one series unit the
    other request's answer is refused, never stored under the wrong name."""
    study, series = test_uid("batch", "study"), test_uid("batch", "series")
    first, second = (
        make_instance(
            patient_id="P1",
            patient_name="Test^Batch",
            study_uid=study,
            series_uid=series,
            sop_uid=test_uid("batch", n),
            modality="CT",
            study_date="20240101",
            accession_number="ACC1",
            rows=8,
            columns=8,
        )
        for n in (1, 2)
    )
    httpserver.expect_request("/wado").respond_with_data(
        first.data, content_type="application/dicom"
    )
    unit = SeriesInstances(study, series, (first.sop_uid, second.sop_uid))
    with pytest.raises(DownloadError) as info:
        Trolley(downloader=WadoURI(httpserver.url_for("/wado"))).download(
            [unit], output_dir=tmp_path
        )
    ((ref, error),) = info.value.failures
    assert ref == unit
    assert isinstance(error, UnexpectedInstanceError) and "SOPInstanceUID" in str(error)
    assert [s.sop_instance_uid for s in info.value.stored] == [first.sop_uid]
    assert len(httpserver.log) == 2


# --- C-GET: associations kept open between retrievals ------------------------------------------


class _Bytes:
    """A sink keeping what arrives, by SOPInstanceUID order of arrival."""

    def __init__(self) -> None:
        self.objects: list[bytes] = []

    def open_instance(self) -> _Bytes.Writer:
        return _Bytes.Writer(self)

    class Writer:
        def __init__(self, sink: _Bytes) -> None:
            self.sink, self.parts = sink, bytearray()

        def write(self, chunk: bytes) -> None:
            self.parts += chunk

        def commit(self) -> None:
            self.sink.objects.append(bytes(self.parts))

        def abort(self) -> None:
            self.parts.clear()


def test_c_get_reuses_one_association_across_units(
    orthanc: OrthancServer, cohort: list[GeneratedInstance], tmp_path: Path
) -> None:
    """Three studies, one worker: one association opened (not three), every object stored."""
    tcp = CountingTcpProxy(orthanc.dicom_port)
    studies = [COHORT_ACCESSIONS[a].study_uid for a in ("ACC1001", "ACC1003", "ACC1005")]
    try:
        downloader = CGet("127.0.0.1", tcp.port, orthanc.aet)
        with Trolley(downloader=downloader, workers=1) as trolley:
            stored = trolley.download([StudyReference(s) for s in studies], tmp_path)
        assert downloader.pool.opened == 1
    finally:
        tcp.close()
    assert len(tcp.opened) == 1
    assert {s.sop_instance_uid for s in stored} == {
        c.sop_uid for c in cohort if c.study_uid in studies
    }


def test_c_get_never_reuses_an_association_a_retrieval_failed_on(orthanc: OrthancServer) -> None:
    spec = COHORT_ACCESSIONS["ACC1003"]
    downloader = CGet("127.0.0.1", orthanc.dicom_port, orthanc.aet)
    pool = downloader.pool
    receiver = StoreReceiver(_Bytes())
    with (
        pytest.raises(RuntimeError),
        pool.use(
            downloader.settings, downloader._make_ae, receiver, ext_neg=list(downloader.roles)
        ) as first,
    ):
        # pynetdicom's per-message logging handlers are off: they cost a fifth of the CPU
        for event in (evt.EVT_PDU_RECV, evt.EVT_PDU_SENT, evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT):
            assert first.get_handlers(event) == []
        raise RuntimeError("the retrieval failed half-way")
    assert first.is_aborted and not first.is_established
    sink = _Bytes()
    assert downloader.fetch(StudyReference(spec.study_uid), sink) == spec.instance_count
    assert pool.opened == 2  # a fresh association, not the aborted one
    downloader.close()


def test_c_get_releases_an_association_idle_too_long(orthanc: OrthancServer) -> None:
    """An idle association is released by the pool's timer (an idle pynetdicom association
    polls every millisecond); the next retrieval opens a new one."""
    spec = COHORT_ACCESSIONS["ACC1005"]
    tcp = CountingTcpProxy(orthanc.dicom_port)
    try:
        downloader = CGet("127.0.0.1", tcp.port, orthanc.aet)
        downloader.pool = AssociationPool(idle_seconds=0.3)
        assert downloader.fetch(StudyReference(spec.study_uid), _Bytes()) == spec.instance_count
        time.sleep(1.0)
        (span,) = tcp.spans
        assert span[1] != float("inf")  # closed without anyone asking
        assert downloader.fetch(StudyReference(spec.study_uid), _Bytes()) == spec.instance_count
        assert downloader.pool.opened == 2
        downloader.close()
    finally:
        tcp.close()


def test_wado_uri_helpers_take_only_slots_no_other_unit_holds() -> None:
    """A unit whose downloader's slots are all held by other units' workers fetches alone
    (more threads would only queue for the same connections); with slots free it gets
    helpers, one per free slot at most."""
    from trolley_etl.backends.wado_uri import _Batch

    def run(slots: threading.BoundedSemaphore) -> set[int]:
        threads: set[int] = set()

        def fetch_one(ref: object, sink: object) -> int:
            threads.add(threading.get_ident())
            time.sleep(0.05)  # long enough for helpers to start
            return 1

        refs = [InstanceReference("1.2", "1.2.3", f"1.2.3.{n}") for n in range(6)]
        assert _Batch(refs, _Bytes(), fetch_one, slots, 3).run() == 6
        return threads

    busy = threading.BoundedSemaphore(3)
    busy.acquire(), busy.acquire()  # two other units' workers; this unit's takes the third
    assert len(run(busy)) == 1
    assert len(run(threading.BoundedSemaphore(3))) == 3
    assert len(run(threading.BoundedSemaphore(8))) == 3  # never more than `most` threads


def test_c_get_by_series_from_the_manifest(orthanc: OrthancServer, tmp_path: Path) -> None:
    """`level: series`: one unit (one C-GET) per series, on the associations kept open."""
    spec = COHORT_ACCESSIONS["ACC1001"]
    dimse = f'host: 127.0.0.1, port: {orthanc.dicom_port}, called_aet: "{orthanc.aet}"'
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"""\
version: 1
name: by-series
source:
  search: {{backend: dicom-qr, {dimse}}}
  download: {{backend: c-get, {dimse}, level: series}}
queries:
  - name: one
    filters: {{AccessionNumber: ACC1001}}
storage:
  root: ./data
"""
    )
    assert main(["run", str(manifest), "-q"]) == 0
    assert main(["status", str(manifest), "--format", "json"]) == 0
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / ".trolley" / "checkpoint.sqlite") as db:
        units = db.execute("SELECT series_uid FROM items").fetchall()
    assert sorted(u for (u,) in units) == sorted(spec.series_uid(i) for i in range(2))
    assert len(list((tmp_path / "data").rglob("*.dcm"))) == spec.instance_count


def test_wado_uri_batch_stops_asking_after_an_error() -> None:
    """An error other than a 404 (a dropped connection, the run stopping) ends the unit:
    requests in flight finish, no new one starts, and the error is raised."""
    from trolley_etl.backends.wado_uri import _Batch

    calls: list[str] = []

    def fetch_one(ref: InstanceReference, sink: object) -> int:
        calls.append(ref.instance_uid)
        time.sleep(0.02)
        raise ConnectionError("the archive went away")

    refs = [InstanceReference("1.2", "1.2.3", f"1.2.3.{n}") for n in range(20)]
    with pytest.raises(ConnectionError, match="went away"):
        _Batch(refs, _Bytes(), fetch_one, threading.BoundedSemaphore(4), 4).run()  # type: ignore[arg-type]
    assert 1 <= len(calls) <= 4  # at most one request per thread, then nothing new
