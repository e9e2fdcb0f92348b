"""Checks of the test harness itself (Orthanc process + synthetic DICOM generator)."""

from __future__ import annotations

import io
import socket

import pydicom
import pytest
import requests

from trolley_etl._harness.dicomgen import (
    COHORT_ACCESSIONS,
    COHORT_PATIENTS,
    CONTROL_CHAR_SERIES_DESCRIPTION,
    HOSTILE,
    HOSTILE_ACCESSION,
    MULTIFRAME_FRAMES,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    PRIVATE_OB_VALUE,
    GeneratedInstance,
    large_series_instances,
    standard_cohort,
)
from trolley_etl._harness.orthanc import OrthancServer, free_port

RLE_LOSSLESS = "1.2.840.10008.1.2.5"


def _one(cohort: list[GeneratedInstance], **match: object) -> GeneratedInstance:
    found = [i for i in cohort if all(getattr(i, k) == v for k, v in match.items())]
    assert found, match
    return found[0]


def _find(server: OrthancServer, level: str, query: dict[str, str]) -> list[dict]:
    resp = server.request(
        "POST", "/tools/find", json={"Level": level, "Query": query, "Expand": True}
    )
    resp.raise_for_status()
    return list(resp.json())


# ----------------------------------------------------------------------------- generator
def test_cohort_is_deterministic_and_well_formed(cohort: list[GeneratedInstance]) -> None:
    again = standard_cohort()
    assert [i.data for i in again] == [i.data for i in cohort]
    assert len({i.sop_uid for i in cohort}) == len(cohort)
    assert {i.patient_id for i in cohort} == {*COHORT_PATIENTS, HOSTILE["PatientID"]}
    assert {i.accession_number for i in cohort} == set(COHORT_ACCESSIONS)
    assert {i.modality for i in cohort} >= {"CT", "MR"}
    for spec in COHORT_ACCESSIONS.values():
        assert sum(i.study_uid == spec.study_uid for i in cohort) == spec.instance_count
    for inst in cohort:
        ds = pydicom.dcmread(io.BytesIO(inst.data))  # Part 10 with preamble + meta
        assert ds.file_meta.TransferSyntaxUID == inst.transfer_syntax
        assert ds.SOPInstanceUID == inst.sop_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == inst.sop_uid


def test_rle_instance_decodes(cohort: list[GeneratedInstance]) -> None:
    pytest.importorskip("numpy")
    rle = _one(cohort, transfer_syntax=RLE_LOSSLESS)
    ds = pydicom.dcmread(io.BytesIO(rle.data))
    arr = ds.pixel_array
    assert arr.shape == (64, 64)
    assert arr.dtype.itemsize == 2
    assert ds.PhotometricInterpretation == "MONOCHROME2"


def test_multiframe_and_private(cohort: list[GeneratedInstance]) -> None:
    mf = _one(cohort, frames=MULTIFRAME_FRAMES)
    ds = pydicom.dcmread(io.BytesIO(mf.data))
    assert ds.NumberOfFrames == MULTIFRAME_FRAMES
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7.3"
    assert ds.pixel_array.shape == (MULTIFRAME_FRAMES, 64, 64)

    priv = _one(cohort, private=True)
    ds = pydicom.dcmread(io.BytesIO(priv.data))
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert block[0x02].value == PRIVATE_OB_VALUE


def test_large_series_is_lazy_and_sized() -> None:
    it = large_series_instances(9_000_000, rows=256, columns=256, frames_per_instance=16)
    items = list(it)
    assert sum(i.size for i in items) >= 9_000_000
    assert len({i.study_uid for i in items}) == 1
    assert 1 <= len({i.series_uid for i in items}) <= 2


# ----------------------------------------------------------------------------- orthanc
def test_seeded_instance_count(orthanc: OrthancServer, cohort: list[GeneratedInstance]) -> None:
    stats = orthanc.statistics()
    assert stats["CountInstances"] == len(cohort)
    assert stats["CountStudies"] == len(COHORT_ACCESSIONS)


@pytest.mark.parametrize("kind", ["rle", "private", "multiframe"])
def test_orthanc_stores_files_unchanged(
    orthanc: OrthancServer, cohort: list[GeneratedInstance], kind: str
) -> None:
    match: dict[str, object] = {
        "rle": {"transfer_syntax": RLE_LOSSLESS},
        "private": {"private": True},
        "multiframe": {"frames": MULTIFRAME_FRAMES},
    }[kind]
    inst = _one(cohort, **match)
    assert orthanc.instance_file(inst.study_uid, inst.series_uid, inst.sop_uid) == inst.data


def test_wado_rs_wildcard_transfer_syntax_returns_stored_bytes(
    orthanc: OrthancServer, cohort: list[GeneratedInstance]
) -> None:
    rle = _one(cohort, transfer_syntax=RLE_LOSSLESS)
    resp = requests.get(
        f"{orthanc.dicomweb_url}/studies/{rle.study_uid}/series/{rle.series_uid}"
        f"/instances/{rle.sop_uid}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        timeout=30,
    )
    assert resp.status_code == 200
    assert rle.data in resp.content  # the single part is the stored file, byte for byte


def test_hostile_values_survive(orthanc: OrthancServer) -> None:
    spec = COHORT_ACCESSIONS[HOSTILE_ACCESSION]
    studies = _find(orthanc, "Study", {"StudyInstanceUID": spec.study_uid})
    assert len(studies) == 1
    tags = studies[0]["MainDicomTags"]
    assert tags["AccessionNumber"] == HOSTILE["AccessionNumber"]
    assert tags["StudyDescription"] == HOSTILE["StudyDescription"]
    assert studies[0]["PatientMainDicomTags"]["PatientID"] == HOSTILE["PatientID"]
    assert studies[0]["PatientMainDicomTags"]["PatientName"] == HOSTILE["PatientName"]

    # Orthanc 1.10 keeps the raw strings: the backslash and the BEL/TAB control characters
    # are neither stripped nor rejected (stored file is unchanged, /tools/find returns them).
    series = _find(orthanc, "Series", {"StudyInstanceUID": spec.study_uid})
    descriptions = {s["MainDicomTags"]["SeriesDescription"] for s in series}
    assert descriptions == {HOSTILE["SeriesDescription"], CONTROL_CHAR_SERIES_DESCRIPTION}

    # QIDO-RS matches the hostile IDs literally, BUT Orthanc 1.10.1 / DICOMweb 1.7 does not
    # percent-decode query values: "PatientID=../TRL666" matches while "..%2FTRL666" (what
    # requests' params= produces) matches nothing; likewise %5E (caret), %20 and "+" never
    # match. So the URL is built by hand here ("/" and "." are legal in a query string).
    resp = requests.get(
        f"{orthanc.dicomweb_url}/studies?PatientID={HOSTILE['PatientID']}",
        headers={"Accept": "application/dicom+json"},
        timeout=30,
    )
    assert resp.status_code == 200
    found = resp.json()
    assert [s["0020000D"]["Value"][0] for s in found] == [spec.study_uid]
    assert found[0]["00080050"]["Value"] == [HOSTILE["AccessionNumber"]]


def test_auth_server(orthanc_auth: OrthancServer, cohort: list[GeneratedInstance]) -> None:
    resp = requests.get(orthanc_auth.dicomweb_url + "/studies", timeout=30)
    assert resp.status_code == 401
    assert resp.headers.get("WWW-Authenticate", "").startswith("Basic")
    bad = requests.get(orthanc_auth.url + "/system", auth=("alice", "nope"), timeout=30)
    assert bad.status_code == 401
    ok = requests.get(orthanc_auth.dicomweb_url + "/studies", auth=orthanc_auth.auth, timeout=30)
    assert ok.status_code == 200
    assert [s["0020000D"]["Value"][0] for s in ok.json()] == [cohort[0].study_uid]


def test_free_port_is_unreachable() -> None:
    port = free_port()
    with socket.socket() as sock, pytest.raises(OSError):
        sock.settimeout(2)
        sock.connect(("127.0.0.1", port))


def test_qido_does_not_percent_decode(orthanc: OrthancServer) -> None:
    """Pin the Orthanc quirk above so a future Orthanc that fixes it is noticed."""
    base = f"{orthanc.dicomweb_url}/studies?PatientID="
    assert len(requests.get(base + "TRL001", timeout=30).json()) == 2
    encoded = requests.get(base + "..%2FTRL666", timeout=30)
    assert encoded.status_code == 200
    assert encoded.json() == []
