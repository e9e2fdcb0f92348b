"""Metadata-only pulls (WADO-RS `/metadata`): against the real Orthanc, and against small
servers that answer as hostile or vendor archives do (Vitrea's structured `UN` values, broken
JSON, an answer too large to hold)."""

from __future__ import annotations

import io
import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from trolley_etl import StorageDir, Trolley
from trolley_etl.backends import WadoRS
from trolley_etl.backends import wado_rs_metadata as metadata
from trolley_etl.core.errors import ResponseFormatError
from trolley_etl.core.model import SeriesReference, StudyReference
from trolley_etl.testing.dicomgen import COHORT_ACCESSIONS, GeneratedInstance

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
    with Trolley(downloader=downloader, storage=StorageDir(tmp_path)) as trolley:
        with pytest.raises(Exception, match="file_format='json'"):
            trolley.download(StudyReference(STUDY.study_uid))
