"""`trolley-etl run` with the other backends a manifest can name."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from trolley_etl._harness.dicomgen import standard_cohort
from trolley_etl._harness.orthanc import free_port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


@pytest.mark.subprocess
def test_local_folder_is_reorganised_into_the_standard_layout(tmp_path: Path) -> None:
    """The example manifest, run on a messy folder: nested random names, non-DICOM files."""
    cohort = standard_cohort()
    messy = tmp_path / "incoming" / "scanner-export"
    for index, instance in enumerate(cohort):
        folder = messy / f"disk{index % 3}" / ("deep" * (index % 2)) / f"x{index % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"IMG{index:04d}").write_bytes(instance.data)
    (messy / "README.txt").write_text("not DICOM")
    (messy / "disk0" / "thumb.jpg").write_bytes(b"\xff\xd8\xff\xe0 not dicom either")
    manifest = tmp_path / "local-reorganise.yaml"
    shutil.copy(Path(__file__).parents[1] / "manifests" / "local-reorganise.yaml", manifest)

    result = run_cli("run", str(manifest))
    assert result.returncode == 0, result.stderr
    root = tmp_path / "data" / "scanner-export-2024"
    expected = {c.sop_uid: c for c in cohort if c.study_date.startswith("2024")}
    stored = sorted(p for p in root.rglob("*.dcm") if ".trolley" not in p.parts)
    assert len(stored) == len(expected)
    for path in stored:
        source = expected[path.stem]
        assert path.relative_to(root).parts == (source.study_uid, source.series_uid, path.name)
        assert path.read_bytes() == source.data
    assert len(list(messy.rglob("IMG*"))) == len(cohort)  # the source folder is untouched

    again = run_cli("run", str(manifest))
    assert again.returncode == 0, again.stderr
    assert '"event": "item.done"' not in again.stderr


def _dimse_manifest(folder: Path, orthanc, download: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dimse.yaml"
    path.write_text(
        f"""\
version: 1
name: dimse-run
source:
  search:
    backend: dicom-qr
    host: 127.0.0.1
    port: {orthanc.dicom_port}
    called_aet: {orthanc.aet}
    calling_aet: TROLLEYTEST
{download}
queries:
  - name: trl002
    filters: {{PatientID: TRL002}}
storage:
  root: ./data
run:
  workers: 2
"""
    )
    return path


def _assert_trl002_pulled(root: Path) -> None:
    expected = {c.sop_uid: c for c in standard_cohort() if c.patient_id == "TRL002"}
    stored = sorted(p for p in root.rglob("*.dcm") if ".trolley" not in p.parts)
    assert {p.stem for p in stored} == set(expected)
    for path in stored:
        ours = pydicom.dcmread(path)
        original = pydicom.dcmread(io.BytesIO(expected[path.stem].data))
        assert ours.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert ours == original  # every element, private tags and pixel data included


def test_dicom_qr_with_implied_c_get(orthanc, tmp_path: Path) -> None:
    manifest = _dimse_manifest(tmp_path, orthanc, "")
    result = run_cli("run", str(manifest))
    assert result.returncode == 0, result.stderr
    _assert_trl002_pulled(tmp_path / "data")


def test_dicom_qr_with_c_move_series_by_series(orthanc, tmp_path: Path) -> None:
    port = free_port()
    orthanc.add_modality("TROLLEYMOVE", "TROLLEYMOVE", "127.0.0.1", port)
    download = f"""\
  download:
    backend: c-move
    host: 127.0.0.1
    port: {orthanc.dicom_port}
    called_aet: {orthanc.aet}
    calling_aet: TROLLEYTEST
    move_destination: {{aet: TROLLEYMOVE, port: {port}}}
    level: series"""
    manifest = _dimse_manifest(tmp_path, orthanc, download)
    result = run_cli("run", str(manifest))
    assert result.returncode == 0, result.stderr
    done = [line for line in result.stderr.splitlines() if '"event": "item.done"' in line]
    assert len(done) == 4 and all('"series_uid"' in line for line in done)  # 2 studies x 2 series
    _assert_trl002_pulled(tmp_path / "data")


def test_qido_rs_search_with_rad69_download_in_batches_per_series(
    orthanc, httpserver, tmp_path: Path
) -> None:
    """RAD-69 needs named instances: the runner lists them per series, then batches them."""
    from test_rad69 import REPOSITORY, DocumentSource

    cohort = standard_cohort()
    source = DocumentSource(cohort)
    httpserver.expect_request("/rids", method="POST").respond_with_handler(source)
    manifest = tmp_path / "rad69.yaml"
    manifest.write_text(
        f"""\
version: 1
name: rad69-run
source:
  search: {{backend: qido-rs, url: "{orthanc.dicomweb_url}"}}
  download:
    backend: rad69
    url: "{httpserver.url_for("/rids")}"
    repository_id: "{REPOSITORY}"
queries:
  - name: trl001
    filters: {{PatientID: TRL001}}
storage:
  root: ./data
"""
    )
    result = run_cli("run", str(manifest))
    assert result.returncode == 0, result.stderr
    expected = {c.sop_uid: c.data for c in cohort if c.patient_id == "TRL001"}
    stored = {p.stem: p.read_bytes() for p in (tmp_path / "data").rglob("*.dcm")}
    assert stored == expected
    assert len(source.requests) == 4  # 2 studies x 2 series, one request per series
