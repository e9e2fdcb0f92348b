"""`verify --repair` is crash-safe, and repairs what `run` found damaged (issue 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, GeneratedInstance, standard_cohort
from trolley_etl._harness.orthanc import OrthancServer

ACCESSIONS = ("ACC1001", "ACC1003", "ACC1004")
STUDY_UIDS = {COHORT_ACCESSIONS[a].study_uid for a in ACCESSIONS}


@pytest.fixture(scope="module")
def expected() -> dict[str, GeneratedInstance]:
    return {c.sop_uid: c for c in standard_cohort() if c.study_uid in STUDY_UIDS}


@pytest.fixture(scope="module")
def archive(tmp_path_factory, expected) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-repair")).start()
    try:
        server.upload_many(c.data for c in expected.values())
        yield server
    finally:
        server.stop()


def trolley(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def pulled(tmp_path: Path, url: str) -> tuple[Path, Path]:
    (tmp_path / "cohort.csv").write_text("AccessionNumber\n" + "\n".join(ACCESSIONS) + "\n")
    manifest = tmp_path / "pull.yaml"
    manifest.write_text(f"""\
version: 1
name: repair
source:
  search: {{backend: qido-rs, url: "{url}/dicom-web"}}
queries:
  - name: cohort
    from_csv: {{path: cohort.csv, column: AccessionNumber}}
storage:
  root: ./data
run:
  workers: 1
""")
    assert trolley("run", str(manifest)).returncode == 0
    return manifest, tmp_path / "data"


def data_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if ".trolley" not in p.parts)


def test_a_repair_killed_half_way_leaves_verify_failing_until_repaired(
    archive, expected, tmp_path
) -> None:
    manifest, root = pulled(tmp_path, archive.url)
    files = data_files(root)
    studies = {p.relative_to(root).parts[0] for p in files}
    assert len(studies) == 3
    for study in studies:  # one file missing in every study: three items to repair
        next(p for p in files if p.relative_to(root).parts[0] == study).unlink()

    killed = trolley(
        "verify", str(manifest), "--repair", env={"TROLLEY_ETL_CRASH_AT": "repair-item:1"}
    )
    assert killed.returncode == -9  # SIGKILL after the first item was reopened

    after = trolley("verify", str(manifest), "--format", "json")
    assert after.returncode == 1, after.stdout  # never 0 while files are missing
    assert json.loads(after.stdout)["counts"]["missing"] == 3

    repaired = trolley("verify", str(manifest), "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert [p.read_bytes() for p in data_files(root)] == [
        expected[p.stem].data for p in data_files(root)
    ]
    assert len(data_files(root)) == len(expected)


def test_a_file_damaged_before_a_rerun_is_repaired_by_verify(archive, expected, tmp_path) -> None:
    manifest, root = pulled(tmp_path, archive.url)
    damaged = data_files(root)[0]
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated: `run` sees the size differ
    rerun = trolley("run", str(manifest))
    assert rerun.returncode == 1  # found at the end of the run, its item pending again
    assert trolley("verify", str(manifest)).returncode == 1
    repaired = trolley("verify", str(manifest), "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert damaged.read_bytes() == expected[damaged.stem].data
