"""`trolley-etl` with an s3:// root: Orthanc on loopback as the archive, SeaweedFS as the bucket.

What a user runs (run, status, verify, report, metadata), and a driver SIGKILLed between
the PUT of an object and its record in the checkpoint: the rerun must end with the bucket
listing equal to the checkpoint, every object's SHA-256 the recorded one, nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, GeneratedInstance, standard_cohort
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl._harness.seaweedfs import SeaweedS3
from trolley_etl.core.objectstore import ObjectStore
from trolley_etl.manifest.models import S3Settings
from trolley_etl.runner.checkpoint import open_checkpoint
from trolley_etl.runner.report import ROOT_TAG_FILES

pytestmark = [pytest.mark.archive, pytest.mark.subprocess]

ACCESSIONS = ("ACC1001", "ACC1003", "ACC1004")
STUDY_UIDS = {COHORT_ACCESSIONS[a].study_uid for a in ACCESSIONS}
KEY_ENV, SECRET_ENV = "TEST_S3_KEY", "TEST_S3_SECRET"


@pytest.fixture(scope="module")
def expected() -> dict[str, GeneratedInstance]:
    return {c.sop_uid: c for c in standard_cohort() if c.study_uid in STUDY_UIDS}


@pytest.fixture(scope="module")
def archive(tmp_path_factory, expected) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-s3")).start()
    try:
        server.upload_many(c.data for c in expected.values())
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory) -> Iterator[SeaweedS3]:
    with SeaweedS3(tmp_path_factory.mktemp("seaweed-cli"), buckets=["cohorts"]) as server:
        yield server


def write_manifest(
    folder: Path, archive_url: str, endpoint: str, prefix: str, *, workers: int = 2, run: str = ""
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cohort.csv").write_text("AccessionNumber\n" + "\n".join(ACCESSIONS) + "\n")
    path = folder / "pull.yaml"
    path.write_text(f"""\
version: 1
name: s3cli
source:
  search: {{backend: qido-rs, url: "{archive_url}/dicom-web"}}
queries:
  - name: cohort
    from_csv: {{path: cohort.csv, column: AccessionNumber}}
storage:
  root: s3://cohorts/{prefix}
  s3: {{endpoint_url: "{endpoint}", access_key_env: {KEY_ENV}, secret_key_env: {SECRET_ENV}}}
run:
  workers: {workers}
  retries: 2
{run}""")
    return path


def trolley(
    *args: str, seaweed: SeaweedS3, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    keys = {KEY_ENV: seaweed.access_key, SECRET_ENV: seaweed.secret_key}
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args, "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **keys, **(env or {})},
    )


def store_of(seaweed: SeaweedS3, prefix: str) -> ObjectStore:
    os.environ.setdefault(KEY_ENV, seaweed.access_key)
    os.environ.setdefault(SECRET_ENV, seaweed.secret_key)
    settings = S3Settings(
        endpoint_url=seaweed.endpoint_url, access_key_env=KEY_ENV, secret_key_env=SECRET_ENV
    )
    return ObjectStore(f"s3://cohorts/{prefix}", settings)


def assert_bucket_is_the_cohort(
    store: ObjectStore, state_root: Path, expected: dict[str, GeneratedInstance]
) -> None:
    """Every unit done; the listing equals the checkpoint (nothing twice, nothing foreign);
    every object's bytes the archive's, its SHA-256 the recorded one."""
    checkpoint = open_checkpoint(state_root)
    try:
        states = {item.state for item in checkpoint.items()}
        files = {f.path: f for f in checkpoint.files()}
    finally:
        checkpoint.close()
    assert states == {"done"}
    listed = dict(store.list_objects())
    payload = {path: size for path, size in listed.items() if path not in ROOT_TAG_FILES}
    assert payload == {path: f.size for path, f in files.items()}
    assert sorted(f.sop_instance_uid for f in files.values()) == sorted(expected)
    for path, record in files.items():
        assert store.hash_object(path) == (record.size, record.sha256)
        data = b"".join(store.iter_bytes(path))
        assert data == expected[record.sop_instance_uid].data
    assert list((state_root / ".trolley" / "tmp").glob("*.part")) == []


def test_run_status_verify_report_metadata_with_a_bucket(archive, seaweed, expected, tmp_path):
    manifest = write_manifest(tmp_path, archive.url, seaweed.endpoint_url, "cli")
    state = tmp_path / "state"
    done = trolley("run", str(manifest), "--state-dir", str(state), seaweed=seaweed)
    assert done.returncode == 0, done.stderr
    assert_bucket_is_the_cohort(store_of(seaweed, "cli"), state, expected)
    status = trolley("status", str(manifest), "--state-dir", str(state), seaweed=seaweed)
    assert status.returncode == 0, status.stderr
    verify = trolley(
        "verify", str(manifest), "--state-dir", str(state), "--format", "json", seaweed=seaweed
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    checked = json.loads(verify.stdout)
    assert checked["ok"] and checked["checked"] == len(expected)
    assert checked["root"] == "s3://cohorts/cli"
    report = trolley(
        "report", str(manifest), "--state-dir", str(state), "--format", "json", seaweed=seaweed
    )
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)["summary"]
    assert summary["instances"] == len(expected)
    assert summary["by_status"] == {"stored": len(expected)}  # found in the bucket listing
    table = trolley(
        "metadata",
        str(manifest),
        "--state-dir",
        str(state),
        "--fields",
        "PatientID,SOPInstanceUID",
        seaweed=seaweed,
    )
    assert table.returncode == 0, table.stderr
    rows = table.stdout.strip().splitlines()[1:]
    assert sorted(row.split(",")[1] for row in rows) == sorted(expected)
    assert all(row.split(",")[0] for row in rows)  # read from the objects' headers
    # a foreign object under the prefix is found by verify (and left alone)
    seaweed.client().put_object(Bucket="cohorts", Key="cli/foreign.dcm", Body=b"not ours")
    verify = trolley("verify", str(manifest), "--state-dir", str(state), seaweed=seaweed)
    assert verify.returncode == 1
    assert "unexpected foreign.dcm" in verify.stdout


def test_driver_sigkilled_between_put_and_record_then_rerun(archive, seaweed, expected, tmp_path):
    manifest = write_manifest(tmp_path, archive.url, seaweed.endpoint_url, "driverkill", workers=1)
    killed = trolley(
        "run", str(manifest), seaweed=seaweed, env={"TROLLEY_ETL_CRASH_AT": "after-rename:4"}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    store = store_of(seaweed, "driverkill")
    assert len(dict(store.list_objects())) >= 4  # objects the checkpoint does not know yet
    rerun = trolley("run", str(manifest), seaweed=seaweed)
    assert rerun.returncode == 0, rerun.stderr
    assert_bucket_is_the_cohort(store, tmp_path / "s3cli.state", expected)


def test_refused_credentials_exit_3_in_one_line(archive, seaweed, tmp_path):
    manifest = write_manifest(tmp_path, archive.url, seaweed.endpoint_url, "badkey")
    refused = trolley("run", str(manifest), seaweed=seaweed, env={SECRET_ENV: "wrong-secret"})
    assert refused.returncode == 3, refused.stderr
    assert "Traceback" not in refused.stderr
    assert "wrong-secret" not in refused.stderr
    assert '"item.failed"' not in refused.stderr  # refused before any unit was fetched
    assert "SignatureDoesNotMatch" in refused.stderr


def test_verify_repair_replaces_a_changed_object(archive, seaweed, expected, tmp_path):
    manifest = write_manifest(tmp_path, archive.url, seaweed.endpoint_url, "repair")
    assert trolley("run", str(manifest), seaweed=seaweed).returncode == 0
    state = tmp_path / "s3cli.state"
    checkpoint = open_checkpoint(state)
    try:
        victim = sorted(f.path for f in checkpoint.files())[0]
    finally:
        checkpoint.close()
    seaweed.client().put_object(Bucket="cohorts", Key=f"repair/{victim}", Body=b"bit rot")
    found = trolley("verify", str(manifest), seaweed=seaweed)
    assert found.returncode == 1
    assert f"changed {victim}" in found.stdout
    repaired = trolley("verify", str(manifest), "--repair", seaweed=seaweed)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert_bucket_is_the_cohort(store_of(seaweed, "repair"), state, expected)
