"""Metadata-only pulls (WADO-RS `/metadata`): against the real Orthanc, and against small
servers that answer as hostile or vendor archives do (Vitrea's structured `UN` values, broken
JSON, an answer too large to hold)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from trolley_etl import StorageDir, Trolley
from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, GeneratedInstance
from trolley_etl.backends import WadoRS
from trolley_etl.backends import wado_rs_metadata as metadata
from trolley_etl.core.errors import DownloadError, ResponseFormatError, StorageError
from trolley_etl.core.model import SeriesReference, StudyReference

STUDY = COHORT_ACCESSIONS["ACC1001"]  # two CT series, one with private elements


def study_instances(cohort: list[GeneratedInstance]) -> dict[str, GeneratedInstance]:
    return {c.sop_uid: c for c in cohort if c.study_uid == STUDY.study_uid}


def test_part10_headers_without_pixels_from_orthanc(orthanc, cohort, tmp_path):
    """The default format: one Part 10 file per instance, every header value of the original
    except pixel data, readable by pydicom, in the usual `.dcm` layout."""
    expected = study_instances(cohort)
    downloader = WadoRS(orthanc.dicomweb_url, metadata_only=True)
    with Trolley(downloader=downloader, storage=StorageDir(tmp_path)) as trolley:
        stored = trolley.download(StudyReference(STUDY.study_uid))
    assert {s.sop_instance_uid for s in stored} == set(expected)
    for item in stored:
        assert item.path.suffix == ".dcm"
        original = pydicom.dcmread(io.BytesIO(expected[item.sop_instance_uid].data))
        header = pydicom.dcmread(item.path)
        assert "PixelData" not in header
        assert item.size < len(expected[item.sop_instance_uid].data)
        for keyword in ("PatientID", "SeriesDescription", "Modality", "Rows", "SOPClassUID"):
            assert header.get(keyword) == original.get(keyword), keyword
        assert item.series_uid == original.SeriesInstanceUID
        assert item.modality == "CT"


def test_json_files_from_orthanc(orthanc, cohort, tmp_path):
    """format json: the archive's DICOM JSON object per instance, named `.json`."""
    expected = study_instances(cohort)
    downloader = WadoRS(orthanc.dicomweb_url, metadata_only=True, format="json")
    storage = StorageDir(tmp_path, file_format="json")
    series_uid = next(iter(expected.values())).series_uid
    with Trolley(downloader=downloader, storage=storage) as trolley:
        stored = trolley.download(SeriesReference(STUDY.study_uid, series_uid))
    wanted = {uid for uid, c in expected.items() if c.series_uid == series_uid}
    assert {s.sop_instance_uid for s in stored} == wanted
    for item in stored:
        assert item.path.name == f"{item.sop_instance_uid}.json"
        dataset = Dataset.from_json(
            json.loads(item.path.read_bytes()), bulk_data_uri_handler=lambda *_: b""
        )
        assert dataset.SOPInstanceUID == item.sop_instance_uid
        assert dataset.StudyInstanceUID == STUDY.study_uid
        assert item.patient_id == STUDY.patient_id


def test_json_answer_into_part10_storage_is_a_clear_error(orthanc, tmp_path):
    downloader = WadoRS(orthanc.dicomweb_url, metadata_only=True, format="json")
    trolley = Trolley(downloader=downloader, storage=StorageDir(tmp_path))
    with trolley, pytest.raises(DownloadError, match="file_format='json'"):
        trolley.download(StudyReference(STUDY.study_uid))


class CountingSink:
    """Receives instances and forgets them (the memory test measures the parser alone)."""

    def __init__(self) -> None:
        self.instances = 0
        self.bytes = 0

    def open_instance(self) -> CountingSink:
        return self

    def write(self, chunk: bytes) -> None:
        self.bytes += len(chunk)

    def commit(self) -> None:
        self.instances += 1

    def abort(self) -> None:
        pass


def test_a_large_answer_streams_in_bounded_memory():
    """About 20 MB of metadata for 4,000 instances, parsed in 64 KiB reads: memory holds one
    instance and the UIDs seen, never the answer (the reference library loads the whole
    array). The bound is per instance, so 100,000 instances behave the same (README)."""
    count = 4_000
    padding = {"00204000": {"vr": "LT", "Value": ["p" * 5000]}}  # ImageComments

    def chunks() -> Iterator[bytes]:
        yield b"["
        for number in range(count):
            text = json.dumps({**vendor_instance(number, structured_un=False), **padding})
            yield (text if number == 0 else "," + text).encode()
        yield b"]"

    sink = CountingSink()
    writer = metadata.MetadataWriter("json")
    tracemalloc.start()
    try:
        stored = writer.stream(chunks(), "http://archive/metadata", sink)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stored == sink.instances == count
    assert sink.bytes > 20_000_000
    assert peak < 3_000_000, peak


# --- a Vitrea-like archive and hostile answers ------------------------------------------------

VENDOR_STUDY = "1.2.826.0.1.3680043.10.1234.1"
VENDOR_SERIES = "1.2.826.0.1.3680043.10.1234.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Vitrea answers private elements it does not know as `UN` whose value is a list of objects.
STRUCTURED_UN = {"vr": "UN", "Value": [{"00291011": {"vr": "LO", "Value": ["vendor"]}}]}


def vendor_instance(number: int, *, structured_un: bool = True) -> dict:
    item = {
        "00080016": {"vr": "UI", "Value": [CT_IMAGE]},
        "00080018": {"vr": "UI", "Value": [f"{VENDOR_SERIES}.{number}"]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "0008103E": {"vr": "LO", "Value": ["AXIAL 1.25"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00100020": {"vr": "LO", "Value": ["PAT-7"]},
        "00180050": {"vr": "DS", "Value": [1.25]},
        "0020000D": {"vr": "UI", "Value": [VENDOR_STUDY]},
        "0020000E": {"vr": "UI", "Value": [VENDOR_SERIES]},
        "00200013": {"vr": "IS", "Value": [number]},
        "00290010": {"vr": "LO", "Value": ["VITREA"]},
        "7FE00010": {"vr": "OW", "BulkDataURI": f"http://127.0.0.1/bulk/{number}"},
    }
    if structured_un:
        item["00291010"] = STRUCTURED_UN
    return item


def serve_metadata(server: HTTPServer, body: bytes | Iterator[bytes], status: int = 200) -> str:
    def handler(request: Request) -> Response:
        chunks = [body] if isinstance(body, bytes) else body
        return Response(chunks, status=status, content_type="application/dicom+json")

    server.expect_request(f"/dicom-web/studies/{VENDOR_STUDY}/metadata").respond_with_handler(
        handler
    )
    return server.url_for("/dicom-web")


def test_structured_un_kept_in_json_and_dropped_with_a_count_in_part10(httpserver, tmp_path):
    items = [vendor_instance(n) for n in (1, 2, 3)]
    url = serve_metadata(httpserver, json.dumps(items).encode())

    as_json = WadoRS(url, metadata_only=True, format="json")
    with Trolley(downloader=as_json, storage=StorageDir(tmp_path / "j", file_format="json")) as t:
        stored = t.download(StudyReference(VENDOR_STUDY))
    assert len(stored) == 3
    for item in stored:
        kept = json.loads(item.path.read_bytes())
        assert kept["00291010"] == STRUCTURED_UN  # exactly as the archive sent it
        assert kept["7FE00010"]["BulkDataURI"].startswith("http://127.0.0.1/bulk/")
    assert as_json.drain_warnings() == []

    as_dicom = WadoRS(url, metadata_only=True)
    with Trolley(downloader=as_dicom, storage=StorageDir(tmp_path / "d")) as t:
        stored = t.download(StudyReference(VENDOR_STUDY))
    assert len(stored) == 3
    for item in stored:
        header = pydicom.dcmread(item.path)
        assert (0x0029, 0x1010) not in header
        assert "PixelData" not in header
        assert header.SliceThickness == 1.25
        assert header.SeriesDescription == "AXIAL 1.25"
        assert str(header.PatientName) == "Doe^Jane"
        assert header[0x0029, 0x0010].value == "VITREA"  # the private creator survives
    assert as_dicom.metadata_writer is not None
    assert as_dicom.metadata_writer.dropped_elements == {"00291010": 3}
    warnings = as_dicom.drain_warnings()
    assert warnings == [
        (
            "metadata.values_dropped",
            {"values": 3, "tags": {"00291010": 3}, "reason": warnings[0][1]["reason"]},
        )
    ]
    assert as_dicom.drain_warnings() == []  # each drop is reported once


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[" + json.dumps(vendor_instance(1)).encode() + b', {"0008', "not valid JSON"),
        (b'{"error": "no such study"}', "expected a DICOM JSON array"),
        (b"<html>Service unavailable</html>", "expected a DICOM JSON array"),
        (b"", "empty"),
        (b"[1, 2]", "expected a DICOM JSON object per instance"),
        (b'[{"00080060": {"vr": "CS", "Value": ["CT"]}}]', "no SOPInstanceUID"),
        (b'[{"not a tag": {"vr": "CS"}}]', "not a DICOM JSON element"),
    ],
)
def test_bad_answers_are_response_format_errors(httpserver, tmp_path, body, message):
    url = serve_metadata(httpserver, body)
    downloader = WadoRS(url, metadata_only=True, format="json")
    storage = StorageDir(tmp_path, file_format="json")
    with pytest.raises(ResponseFormatError, match=message) as caught:
        downloader.fetch(StudyReference(VENDOR_STUDY), storage)
    assert f"{url}/studies/{VENDOR_STUDY}/metadata" in str(caught.value)


def test_an_instance_too_large_to_hold_is_refused(httpserver, tmp_path, monkeypatch):
    monkeypatch.setattr(metadata, "MAX_INSTANCE_BYTES", 20_000)
    huge = vendor_instance(1)
    huge["00081030"] = {"vr": "LO", "Value": ["x" * 60] * 3_000}  # 200 kB in one instance
    url = serve_metadata(httpserver, json.dumps([vendor_instance(2), huge]).encode())
    downloader = WadoRS(url, metadata_only=True, format="json")
    with pytest.raises(ResponseFormatError, match="larger than"):
        downloader.fetch(StudyReference(VENDOR_STUDY), StorageDir(tmp_path, file_format="json"))


def test_duplicate_instances_count_once(httpserver, tmp_path):
    url = serve_metadata(httpserver, json.dumps([vendor_instance(1)] * 2).encode())
    downloader = WadoRS(url, metadata_only=True, format="json")
    count = downloader.fetch(StudyReference(VENDOR_STUDY), StorageDir(tmp_path, file_format="json"))
    assert count == 1


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="dicom, json"):
        WadoRS("http://127.0.0.1:1/dicom-web", metadata_only=True, format="xml")  # type: ignore[arg-type]


def test_reference_path_for_instance_level(httpserver, tmp_path):
    """Objects known down to instances are asked for one by one at instance level."""
    from trolley_etl.core.model import InstanceReference

    uid = f"{VENDOR_SERIES}.5"
    path = f"/dicom-web/studies/{VENDOR_STUDY}/series/{VENDOR_SERIES}/instances/{uid}/metadata"
    httpserver.expect_request(path).respond_with_json([vendor_instance(5)])
    downloader = WadoRS(httpserver.url_for("/dicom-web"), metadata_only=True)
    storage = StorageDir(tmp_path)
    assert downloader.fetch(InstanceReference(VENDOR_STUDY, VENDOR_SERIES, uid), storage) == 1
    assert (tmp_path / VENDOR_STUDY / VENDOR_SERIES / f"{uid}.dcm").exists()


# --- through the runner: manifest, checkpoint, completeness, report ------------------------


def write_manifest(folder: Path, search_url: str, download: str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "headers.yaml"
    path.write_text(
        f"""\
version: 1
name: headers-only
source:
  search: {{backend: qido-rs, url: "{search_url}"}}
  download: {download}
queries:
  - name: chest
    filters: {{AccessionNumber: ACC1001}}
storage:
  root: ./data
run:
  workers: 2
  retries: 1
{extra}"""
    )
    return path


def trolley_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_run_metadata_only_part10_is_complete_and_resumable(orthanc, cohort, tmp_path):
    expected = study_instances(cohort)
    url = orthanc.dicomweb_url
    manifest = write_manifest(
        tmp_path, url, f'{{backend: wado-rs, url: "{url}", metadata_only: true}}'
    )
    locked = trolley_cli("lock", str(manifest))
    assert locked.returncode == 0, locked.stderr
    first = trolley_cli("run", str(manifest), "--log-format", "json")
    assert first.returncode == 0, first.stderr
    assert [
        e
        for e in events(first.stderr)
        if e.get("event") == "checkpoint.resolved" and e.get("from_lock")
    ]
    files = sorted((tmp_path / "data").rglob("*.dcm"))
    assert {pydicom.dcmread(f).SOPInstanceUID for f in files} == set(expected)
    assert all("PixelData" not in pydicom.dcmread(f) for f in files)
    download = [
        e
        for e in events(first.stderr)
        if e.get("event") == "step.end" and e.get("step") == "download"
    ]
    assert download[0]["instances"] == len(expected)
    again = trolley_cli("run", str(manifest), "--log-format", "json")
    assert again.returncode == 0, again.stderr
    assert not [e for e in events(again.stderr) if e.get("event") == "item.done"]
    status = trolley_cli("status", str(manifest))
    assert status.returncode == 0, status.stderr
    report = trolley_cli("report", str(manifest), "--format", "json")
    assert report.returncode == 0, report.stderr
    assert all(uid in report.stdout for uid in expected)  # every instance is in the audit


def test_run_metadata_only_json(orthanc, cohort, tmp_path):
    expected = study_instances(cohort)
    url = orthanc.dicomweb_url
    manifest = write_manifest(
        tmp_path, url, f'{{backend: wado-rs, url: "{url}", metadata_only: true, format: json}}'
    )
    result = trolley_cli("run", str(manifest), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    files = [f for f in (tmp_path / "data").rglob("*.json") if ".trolley" not in f.parts]
    assert {f.stem for f in files} == set(expected)
    assert not list((tmp_path / "data").rglob("*.dcm"))
    verify = trolley_cli("verify", str(manifest))
    assert verify.returncode == 0, verify.stderr


def test_run_with_a_broken_metadata_answer_fails_the_item_without_traceback(
    orthanc, httpserver, tmp_path
):
    """The search finds the study on Orthanc; the metadata archive answers truncated JSON."""
    path = f"/dicom-web/studies/{STUDY.study_uid}/metadata"
    httpserver.expect_request(path).respond_with_data(
        b'[{"00080018": {"vr": "UI", "Value": ["1.2', content_type="application/dicom+json"
    )
    broken = httpserver.url_for("/dicom-web")
    manifest = write_manifest(
        tmp_path,
        orthanc.dicomweb_url,
        f'{{backend: wado-rs, url: "{broken}", metadata_only: true}}',
    )
    result = trolley_cli("run", str(manifest), "--log-format", "json")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    failed = [e for e in events(result.stderr) if e.get("event") == "item.failed"]
    assert failed and "not valid JSON" in failed[0]["error"]
    assert failed[0]["error_type"] == "ResponseFormatError"


@pytest.mark.subprocess
def test_format_json_needs_metadata_only(tmp_path):
    manifest = write_manifest(
        tmp_path,
        "http://127.0.0.1:1/dicom-web",
        '{backend: wado-rs, url: "http://127.0.0.1:1/dicom-web", format: json}',
    )
    result = trolley_cli("validate", str(manifest))
    assert result.returncode == 2
    assert "format: json applies to metadata_only: true" in result.stdout + result.stderr


def test_full_pull_manifests_resolve_as_before():
    """The new fields are left out of a full pull's dump, so existing checkpoints still match."""
    from trolley_etl.manifest.models import WadoRsDownload

    full = WadoRsDownload(backend="wado-rs", url="http://127.0.0.1/dicom-web")
    assert "metadata_only" not in full.model_dump(mode="json")
    headers = WadoRsDownload(backend="wado-rs", url="http://x/d", metadata_only=True)
    assert headers.model_dump(mode="json")["format"] == "dicom"


# --- DICOM Query/Retrieve archives: an instance-level C-FIND ---------------------------------


def test_c_find_metadata_from_orthanc(orthanc, cohort, tmp_path):
    """The same kind of files from a DICOM archive: one per instance, with the asked keys."""
    from trolley_etl.backends.dicom_qr_metadata import DicomQRMetadata

    expected = study_instances(cohort)
    downloader = DicomQRMetadata(
        "127.0.0.1",
        orthanc.dicom_port,
        orthanc.aet,
        keywords=["SeriesDescription", "Modality", "PatientID", "Rows", "SOPClassUID"],
    )
    with Trolley(downloader=downloader, storage=StorageDir(tmp_path)) as trolley:
        stored = trolley.download(StudyReference(STUDY.study_uid))
    assert {s.sop_instance_uid for s in stored} == set(expected)
    for item in stored:
        original = pydicom.dcmread(io.BytesIO(expected[item.sop_instance_uid].data))
        header = pydicom.dcmread(item.path)
        for keyword in ("SeriesDescription", "Modality", "PatientID", "SOPClassUID"):
            assert header.get(keyword) == original.get(keyword), keyword
        assert "QueryRetrieveLevel" not in header
        assert "PixelData" not in header

    as_json = DicomQRMetadata("127.0.0.1", orthanc.dicom_port, orthanc.aet, format="json")
    storage = StorageDir(tmp_path / "json", file_format="json")
    with Trolley(downloader=as_json, storage=storage) as trolley:
        stored = trolley.download(StudyReference(STUDY.study_uid))
    assert {s.sop_instance_uid for s in stored} == set(expected)
    assert all(s.path.suffix == ".json" for s in stored)


def test_run_c_find_metadata_through_the_runner(orthanc, cohort, tmp_path):
    expected = study_instances(cohort)
    download = (
        f"{{backend: dicom-qr, metadata_only: true, host: 127.0.0.1, port: {orthanc.dicom_port}, "
        f"called_aet: {orthanc.aet}, keywords: [SeriesDescription, Modality, Rows], format: json}}"
    )
    manifest = write_manifest(tmp_path, orthanc.dicomweb_url, download)
    result = trolley_cli("run", str(manifest), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    files = [f for f in (tmp_path / "data").rglob("*.json") if ".trolley" not in f.parts]
    assert {f.stem for f in files} == set(expected)
    row = json.loads(files[0].read_bytes())
    assert row["00080060"]["Value"] == ["CT"]  # Modality, asked for
    assert "00080052" not in row  # QueryRetrieveLevel belongs to the answer, not the instance


@pytest.mark.subprocess
def test_c_find_metadata_needs_metadata_only_and_known_keywords(tmp_path):
    base = "backend: dicom-qr, host: 127.0.0.1, port: 104, called_aet: PACS"
    for download, message in [
        (f"{{{base}}}", "metadata_only"),
        (f"{{{base}, metadata_only: true, keywords: [SliceThicknes]}}", "SliceThickness"),
    ]:
        manifest = write_manifest(tmp_path, "http://127.0.0.1:1/dicom-web", download)
        result = trolley_cli("validate", str(manifest))
        assert result.returncode == 2
        assert message in result.stdout + result.stderr


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the SS text
@pytest.mark.parametrize(
    "element",
    [
        {"vr": "US", "Value": [70000]},  # pydicom builds it, writing it fails
        {"vr": "SQ", "Value": [{"00291010": STRUCTURED_UN}]},  # unwritable inside a sequence
        {"vr": "SS", "Value": ["abc"]},  # pydicom refuses to build it
    ],
)
def test_any_unwritable_value_is_dropped_and_counted(element):
    item = {**vendor_instance(1, structured_un=False), "00291020": element}
    data, dropped = metadata.part10_bytes(item)
    assert dropped == ["00291020"]
    header = pydicom.dcmread(io.BytesIO(data))
    assert (0x0029, 0x1020) not in header
    assert header.SOPInstanceUID == f"{VENDOR_SERIES}.1"
    assert header.SliceThickness == 1.25


@pytest.mark.parametrize("file_format", ["dicom", "json"])
def test_fetch_all_datasets_yields_headers_in_both_formats(orthanc, cohort, file_format):
    expected = study_instances(cohort)
    downloader = WadoRS(orthanc.dicomweb_url, metadata_only=True, format=file_format)
    with Trolley(downloader=downloader) as trolley:
        datasets = list(trolley.fetch_all_datasets(StudyReference(STUDY.study_uid)))
    assert {ds.SOPInstanceUID for ds in datasets} == set(expected)
    assert all(ds.PatientID == STUDY.patient_id for ds in datasets)


def test_run_reports_values_part10_dropped_once(orthanc, cohort, httpserver, tmp_path):
    """A Vitrea-like archive: Orthanc's own metadata with a structured `UN` added to every
    instance. The run is complete, and the log says once how many values were dropped."""
    import re

    import requests

    def vitrea_like(request: Request) -> Response:
        upstream = requests.get(
            orthanc.url + request.path, timeout=30, headers={"Accept": "application/dicom+json"}
        )
        items = upstream.json()
        for item in items:
            item["00290010"] = {"vr": "LO", "Value": ["VITREA"]}
            item["00291010"] = STRUCTURED_UN
        return Response(json.dumps(items), content_type="application/dicom+json")

    httpserver.expect_request(re.compile(r"/dicom-web/.*/metadata$")).respond_with_handler(
        vitrea_like
    )
    vendor = httpserver.url_for("/dicom-web")
    download = f'{{backend: wado-rs, url: "{vendor}", metadata_only: true}}'
    manifest = write_manifest(tmp_path, orthanc.dicomweb_url, download)
    result = trolley_cli("run", str(manifest), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    expected = study_instances(cohort)
    files = sorted((tmp_path / "data").rglob("*.dcm"))
    assert len(files) == len(expected)
    assert all((0x0029, 0x1010) not in pydicom.dcmread(f) for f in files)
    dropped = [e for e in events(result.stderr) if e.get("event") == "metadata.values_dropped"]
    assert len(dropped) == 1
    assert dropped[0]["values"] == len(expected)
    assert dropped[0]["tags"] == {"00291010": len(expected)}
    assert dropped[0]["level"] == "warning"


def test_instances_of_another_study_are_refused(httpserver, tmp_path):
    """An archive that answers a study's /metadata with another study's instances."""
    stranger = vendor_instance(1)
    stranger["0020000D"] = {"vr": "UI", "Value": ["1.2.3.999"]}
    url = serve_metadata(httpserver, json.dumps([vendor_instance(2), stranger]).encode())
    downloader = WadoRS(url, metadata_only=True, format="json")
    with pytest.raises(ResponseFormatError, match="another object"):
        downloader.fetch(StudyReference(VENDOR_STUDY), StorageDir(tmp_path, file_format="json"))


def test_stored_json_files_read_back_as_datasets(httpserver, tmp_path):
    """What readers of stored files (the metadata table, de-identification) use for JSON."""
    from trolley_etl.core.json_header import is_json_file, read_json_dataset

    url = serve_metadata(httpserver, json.dumps([vendor_instance(1)]).encode())
    storage = StorageDir(tmp_path, file_format="json")
    WadoRS(url, metadata_only=True, format="json").fetch(StudyReference(VENDOR_STUDY), storage)
    (path,) = [p for p in tmp_path.rglob("*.json") if ".trolley" not in p.parts]
    assert is_json_file(path)
    dataset = read_json_dataset(path)
    assert dataset.SliceThickness == 1.25
    assert dataset.SOPInstanceUID == f"{VENDOR_SERIES}.1"


def test_json_layout_mapping_two_instances_to_one_file_is_an_error(httpserver, tmp_path):
    url = serve_metadata(httpserver, json.dumps([vendor_instance(1), vendor_instance(2)]).encode())
    storage = StorageDir(tmp_path, "{PatientID}.json", file_format="json")
    with pytest.raises(StorageError, match="maps two instances"):
        WadoRS(url, metadata_only=True, format="json").fetch(StudyReference(VENDOR_STUDY), storage)
