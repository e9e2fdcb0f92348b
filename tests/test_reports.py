"""What people read, against a real pull from Orthanc: the metadata table (CSV, Parquet),
the HTML report in headless Chromium, the Markdown summary and the plan table."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from trolley_etl.runner.checkpoint import Checkpoint
from trolley_etl.testing.orthanc import OrthancServer

PATIENTS = "TRL00*"  # the three regular patients, not the hostile study


def trolley(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})},
    )  # fmt: skip


def write_manifest(folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pull.yaml"
    path.write_text(
        f"""\
version: 1
name: reports-test
source:
  search: {{backend: qido-rs, url: "{url}/dicom-web"}}
queries:
  - name: trial
    filters: {{PatientID: "{PATIENTS}"}}
storage:
  root: ./data
run:
  workers: 2
  retries: 0
"""
    )
    return path


@pytest.fixture(scope="module")
def pulled(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest whose pull completed; returns the manifest path (data in ./data)."""
    manifest = write_manifest(tmp_path_factory.mktemp("reports"), orthanc.url)
    result = trolley("run", str(manifest), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    return manifest


def stored(manifest: Path) -> list[dict]:
    checkpoint = Checkpoint(manifest.parent / "data" / ".trolley" / "checkpoint.sqlite")
    try:
        return list(checkpoint.files())
    finally:
        checkpoint.close()


# --- metadata ---------------------------------------------------------------------------------


def test_metadata_instance_rows_match_the_stored_headers(pulled: Path) -> None:
    result = trolley("metadata", str(pulled), "--fields",
                     "PatientID,AccessionNumber,SOPInstanceUID,Modality,Rows,InstanceNumber")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    files = stored(pulled)
    assert len(rows) == len(files) > 0
    root = pulled.parent / "data"
    for row in rows:
        path = root / row["path"]
        data = path.read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert int(row["size"]) == len(data)
        ds = pydicom.dcmread(path)
        assert row["PatientID"] == ds.PatientID
        assert row["AccessionNumber"] == ds.AccessionNumber
        assert row["SOPInstanceUID"] == ds.SOPInstanceUID
        assert row["Modality"] == ds.Modality
        assert row["Rows"] == str(ds.Rows)
        assert row["InstanceNumber"] == str(ds.InstanceNumber)
    assert list(rows[0]) == ["PatientID", "AccessionNumber", "SOPInstanceUID", "Modality",
                             "Rows", "InstanceNumber", "path", "size", "sha256"]  # fmt: skip


def test_metadata_series_and_study_levels_count_what_is_stored(pulled: Path) -> None:
    files = stored(pulled)
    series = trolley("metadata", str(pulled), "--level", "series")
    assert series.returncode == 0, series.stderr
    rows = list(csv.DictReader(io.StringIO(series.stdout)))
    per_series = Counter(f["series_uid"] for f in files)
    assert {r["SeriesInstanceUID"]: int(r["instances"]) for r in rows} == per_series
    size = {r["SeriesInstanceUID"]: int(r["size"]) for r in rows}
    for uid in per_series:
        assert size[uid] == sum(f["size"] for f in files if f["series_uid"] == uid)

    study = trolley("metadata", str(pulled), "--level", "study")
    assert study.returncode == 0, study.stderr
    rows = list(csv.DictReader(io.StringIO(study.stdout)))
    per_study = Counter(f["study_uid"] for f in files)
    assert {r["StudyInstanceUID"]: int(r["instances"]) for r in rows} == per_study
    ct_mr = next(r for r in rows if r["AccessionNumber"] == "ACC1003")
    assert ct_mr["modalities"] == "CT\\MR" and ct_mr["series"] == "2"


def test_metadata_parquet_has_the_same_rows_as_csv(pulled: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra")
    out = tmp_path / "cohort.parquet"
    result = trolley("metadata", str(pulled), "--format", "parquet", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    table = pq.read_table(out).to_pylist()
    as_csv = list(csv.DictReader(io.StringIO(trolley("metadata", str(pulled)).stdout)))
    assert len(table) == len(as_csv) == len(stored(pulled))
    assert [{k: str(v) for k, v in row.items()} for row in table] == as_csv
    assert all(isinstance(row["size"], int) for row in table)


def test_metadata_refuses_unknown_keywords(pulled: Path) -> None:
    result = trolley("metadata", str(pulled), "--fields", "PatientID,NotAKeyword")
    assert result.returncode == 2
    assert "NotAKeyword" in result.stderr and "Traceback" not in result.stderr


def test_parquet_without_pyarrow_says_which_extra_to_install(monkeypatch) -> None:
    from trolley_etl.reports import metadata

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(metadata.MetadataError, match=r"trolley-etl\[parquet\]"):
        metadata.write_table(iter([]), ["path"], "parquet", Path("x.parquet"), sys.stdout)
