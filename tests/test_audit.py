"""Lock files, audit reports, BagIt manifests and verify, against a real Orthanc."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, GeneratedInstance, standard_cohort
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl.core.errors import LockFileError
from trolley_etl.core.model import InstanceReference, SeriesReference, StudyReference
from trolley_etl.runner import lockfile
from trolley_etl.runner.checkpoint import Checkpoint

LOCKED = ("ACC1001", "ACC1003", "ACC1004")  # patients TRL001 and TRL002
LATE = "ACC1005"  # patient TRL003: added to the archive after the lock


def instances_of(*accessions: str) -> dict[str, GeneratedInstance]:
    uids = {COHORT_ACCESSIONS[a].study_uid for a in accessions}
    return {c.sop_uid: c for c in standard_cohort() if c.study_uid in uids}


@pytest.fixture(scope="module")
def expected() -> dict[str, GeneratedInstance]:
    return instances_of(*LOCKED)


@pytest.fixture(scope="module")
def archive(tmp_path_factory, expected) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-audit")).start()
    try:
        server.upload_many(c.data for c in expected.values())
        yield server
    finally:
        server.stop()


def write_manifest(
    folder: Path, search: str, *, patients: str = "TRL00*", layout: str | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pull.yaml"
    storage = f'\n  layout: "{layout}"' if layout else ""
    path.write_text(
        f"""\
version: 1
name: audit-test
source:
  search: {search}
queries:
  - name: trial
    filters: {{PatientID: "{patients}"}}
storage:
  root: ./data{storage}
run:
  workers: 2
  retries: 1
"""
    )
    return path


def qido(url: str) -> str:
    return f'{{backend: qido-rs, url: "{url}/dicom-web"}}'


def trolley(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def data_files(root: Path) -> dict[str, Path]:
    return {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*.dcm")
        if ".trolley" not in p.relative_to(root).parts
    }


def stems(root: Path) -> set[str]:
    return {p.stem for p in data_files(root).values()}


# --- lock files ------------------------------------------------------------------------------


@pytest.mark.archive
def test_lock_then_run_pulls_exactly_the_locked_set_and_reports_drift(tmp_path) -> None:
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        locked = instances_of(*LOCKED)
        server.upload_many(c.data for c in locked.values())
        manifest = write_manifest(tmp_path / "pull", qido(server.url))
        lock_path = tmp_path / "pull" / "pull.yaml.lock.json"

        first = trolley("lock", str(manifest))
        assert first.returncode == 0, first.stderr
        assert f"wrote {lock_path}: 3 studies, 3 retrieval items" in first.stdout
        text = lock_path.read_text()
        data = json.loads(text)
        assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"  # stable, diff-friendly
        studies = data["query_sets"]["trial"]["studies"]
        assert [s["study_uid"] for s in studies] == sorted(
            COHORT_ACCESSIONS[a].study_uid for a in LOCKED
        )
        assert "TRL00" not in text and "ACC10" not in text  # UIDs only, no patient keys
        again = trolley("lock", str(manifest))
        assert again.returncode == 0 and again.stdout.startswith("unchanged")
        assert lock_path.read_text() == text

        # the archive gains a study that matches the query: a locked run ignores it, says so
        server.upload_many(c.data for c in instances_of(LATE).values())
        run = trolley("run", str(manifest))
        assert run.returncode == 0, run.stderr
        root = tmp_path / "pull" / "data"
        assert stems(root) == set(locked)
        drift = [e for e in events(run.stderr) if e["event"] == "lock.drift"]
        assert len(drift) == 1 and drift[0]["level"] == "warning"
        assert drift[0]["added"] == 1 and drift[0]["removed"] == 0
        assert drift[0]["added_studies"] == {"trial": [COHORT_ACCESSIONS[LATE].study_uid]}
        report = trolley("report", str(manifest))
        assert report.returncode == 0, report.stderr
        audit = json.loads(report.stdout)
        assert audit["runs"][0]["lock_drift"]["added"] == 1
        assert audit["runs"][0]["lock_sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert audit["lock"]["used_by_checkpoint"] == audit["runs"][0]["lock_sha256"]

        # a rerun with the same lock neither searches nor downloads
        rerun = trolley("run", str(manifest))
        assert rerun.returncode == 0, rerun.stderr
        assert not [e for e in events(rerun.stderr) if e["event"] in ("search.query", "item.done")]

        # locking again takes the new study in; the next run pulls it
        relock = trolley("lock", str(manifest))
        assert relock.returncode == 0, relock.stderr
        assert "4 studies" in relock.stdout and "1 added, 0 removed" in relock.stdout
        third = trolley("run", str(manifest))
        assert third.returncode == 0, third.stderr
        assert stems(root) == set(locked) | set(instances_of(LATE))
        assert not [e for e in events(third.stderr) if e["event"] == "lock.drift"]

        # a manifest that pulls something else makes the lock outdated: refused, exit 2
        write_manifest(tmp_path / "pull", qido(server.url), patients="TRL001")
        outdated = trolley("run", str(manifest))
        assert outdated.returncode == 2
        assert "pull.yaml.lock.json was written for another version" in outdated.stderr
        # --refresh re-resolves from the archive and rewrites the lock
        refreshed = trolley("run", "--refresh", str(manifest))
        assert refreshed.returncode == 0, refreshed.stderr
        relocked = json.loads(lock_path.read_text())
        assert [s["study_uid"] for s in relocked["query_sets"]["trial"]["studies"]] == [
            COHORT_ACCESSIONS["ACC1001"].study_uid
        ]
        assert trolley("run", str(manifest)).returncode == 0
    finally:
        server.stop()


def test_lock_format_round_trips_every_reference_level() -> None:
    refs = [
        StudyReference("1.1"),
        SeriesReference("1.2", "1.2.1"),
        SeriesReference("1.2", "1.2.2"),
        InstanceReference("1.3", "1.3.1", "1.3.1.2"),
        InstanceReference("1.3", "1.3.1", "1.3.1.1"),
    ]
    lock = lockfile.Lock.from_resolution(
        "x", "hash", [("a", "1.1"), ("b", "1.2"), ("a", "1.3")], refs
    )
    again = lockfile.Lock.from_json(json.loads(lock.text()), "test")
    assert set(again.references()) == set(refs)
    assert again.study_owners() == {"1.1": "a", "1.2": "b", "1.3": "a"}
    assert lock.text() == again.text()
    drift = lockfile.diff(lock, {"a": {"1.1", "1.4"}, "b": {"1.2"}})
    assert drift.added == {"a": ["1.4"], "b": []} and drift.removed == {"a": ["1.3"], "b": []}
    with pytest.raises(LockFileError, match="lock_version"):
        lockfile.Lock.from_json({"lock_version": 99}, "test")


# --- report and BagIt manifest -----------------------------------------------------------------


def test_report_counts_and_checksums_match_the_disk(archive, expected, tmp_path) -> None:
    manifest = write_manifest(tmp_path, qido(archive.url))
    run = trolley("run", str(manifest))
    assert run.returncode == 0, run.stderr
    root = tmp_path / "data"
    on_disk = data_files(root)

    result = trolley("report", str(manifest), "--format", "json")
    assert result.returncode == 0, result.stderr
    audit = json.loads(result.stdout)
    rows = audit["instances"]
    assert {r["path"] for r in rows} == set(on_disk)
    for row in rows:
        path = on_disk[row["path"]]
        assert row["status"] == "stored"
        assert row["size"] == path.stat().st_size
        assert row["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        source = expected[row["sop_instance_uid"]]
        assert (row["study_uid"], row["series_uid"]) == (source.study_uid, source.series_uid)
        assert row["patient_id"] == source.patient_id
        assert row["accession_number"] == source.accession_number
        assert row["study_date"] == source.study_date
        assert row["modality"] == source.modality
        assert row["sop_class_uid"] == source.sop_class_uid
        assert row["transfer_syntax"] == source.transfer_syntax
        assert row["source"] == f"wado-rs {archive.url}/dicom-web"
        assert row["query_set"] == "trial"

    summary = audit["summary"]
    assert summary["instances"] == len(expected)
    assert summary["bytes"] == sum(p.stat().st_size for p in on_disk.values())
    assert summary["by_status"] == {"stored": len(expected)}
    modalities = Counter(c.modality for c in expected.values())
    assert {k: v["instances"] for k, v in summary["by_modality"].items()} == modalities
    assert {uid: s["instances"] for uid, s in summary["by_study"].items()} == Counter(
        c.study_uid for c in expected.values()
    )

    (run_record,) = audit["runs"]
    run_id = events(run.stderr)[0]["run_id"]
    assert run_record["run_id"] == run_id and run_record["status"] == "complete"
    assert run_record["started_at"] <= run_record["finished_at"]
    assert run_record["manifest_path"] == str(manifest)
    assert run_record["manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert run_record["lock_sha256"] is None
    assert run_record["user"] and run_record["host"] and run_record["tool_version"]
    assert run_record["search"] == f"qido-rs {archive.url}/dicom-web"
    assert audit["manifest"]["sha256"] == run_record["manifest_sha256"]

    # the run wrote the same report for itself, and the saved copy of this one exists
    per_run = json.loads((root / ".trolley" / "reports" / f"{run_id}.json").read_text())
    assert per_run["status"] == "complete" and per_run["summary"] == summary
    saved = sorted((root / ".trolley" / "reports").glob("report-*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["instances"] == rows

    as_csv = trolley("report", str(manifest), "--format", "csv", "--output", str(tmp_path / "r"))
    assert as_csv.returncode == 0, as_csv.stderr
    table = list(csv.DictReader(io.StringIO((tmp_path / "r").read_text())))
    assert len(table) == len(expected)
    assert {(r["path"], r["sha256"], int(r["size"])) for r in table} == {
        (r["path"], r["sha256"], r["size"]) for r in rows
    }

    # manifest-sha256.txt: standard tools check the export without trolley-etl
    bag_manifest = (root / "manifest-sha256.txt").read_text().splitlines()
    assert sorted(bag_manifest) == sorted(f"{r['sha256']}  {r['path']}" for r in rows)
    assert not (root / "bagit.txt").exists()  # payload is not under data/: not a full bag
    check = subprocess.run(
        ["sha256sum", "--check", "--quiet", "manifest-sha256.txt"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_a_layout_under_data_makes_the_root_a_bagit_bag(archive, expected, tmp_path) -> None:
    layout = "data/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
    manifest = write_manifest(tmp_path, qido(archive.url), layout=layout)
    assert trolley("run", str(manifest)).returncode == 0
    root = tmp_path / "data"
    assert (root / "bagit.txt").read_text() == (
        "BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"
    )
    info = dict(line.split(": ", 1) for line in (root / "bag-info.txt").read_text().splitlines())
    total = sum(c.size for c in expected.values())
    assert info["Payload-Oxum"] == f"{total}.{len(expected)}"
    lines = (root / "manifest-sha256.txt").read_text().splitlines()
    assert len(lines) == len(expected) and all(
        line.split("  ")[1].startswith("data/") for line in lines
    )
    # RFC 8493 3: every payload file is in the manifest and nothing else is in data/
    payload = {p.relative_to(root).as_posix() for p in (root / "data").rglob("*") if p.is_file()}
    assert payload == {line.split("  ", 1)[1] for line in lines}
    check = subprocess.run(
        ["sha256sum", "--check", "--quiet", "manifest-sha256.txt"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


# --- verify ------------------------------------------------------------------------------------


def test_verify_finds_changed_missing_and_unexpected_files_and_repairs(
    archive, expected, tmp_path
) -> None:
    manifest = write_manifest(tmp_path, qido(archive.url))
    assert trolley("run", str(manifest)).returncode == 0
    root = tmp_path / "data"
    clean = trolley("verify", str(manifest))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert f"{len(expected)} files checked" in clean.stdout and "0 changed" in clean.stdout

    files = sorted(data_files(root))
    flipped, deleted = files[0], files[-1]
    content = bytearray((root / flipped).read_bytes())
    content[-10] ^= 0xFF  # same size, different bytes: only the checksum can tell
    (root / flipped).write_bytes(bytes(content))
    (root / deleted).unlink()
    (root / "notes.txt").write_text("someone's own file\n")

    broken = trolley("verify", str(manifest), "--format", "json")
    assert broken.returncode == 1
    found = json.loads(broken.stdout)
    assert found["counts"] == {"missing": 1, "changed": 1, "unexpected": 1}
    kinds = {p["path"]: p["kind"] for p in found["problems"]}
    assert kinds == {flipped: "changed", deleted: "missing", "notes.txt": "unexpected"}
    bag = subprocess.run(
        ["sha256sum", "--check", "--quiet", "manifest-sha256.txt"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert bag.returncode != 0 and flipped in bag.stdout  # standard tools see it too

    repaired = trolley("verify", str(manifest), "--repair")
    # the broken files come back; the unexpected one is left alone, so still exit 1
    assert repaired.returncode == 1, repaired.stdout + repaired.stderr
    assert "unexpected notes.txt" in repaired.stdout and "0 missing, 0 changed" in repaired.stdout
    for path in (flipped, deleted):
        assert (root / path).read_bytes() == expected[Path(path).stem].data
    repair_runs = [e for e in events(repaired.stderr) if e["event"] == "run.start"]
    assert len(repair_runs) == 1
    (root / "notes.txt").unlink()
    assert trolley("verify", str(manifest)).returncode == 0
    audit = json.loads(trolley("report", str(manifest)).stdout)
    assert [r["purpose"] for r in audit["runs"]] == ["run", "repair"]
    assert audit["summary"]["by_status"] == {"stored": len(expected)}


def test_verify_without_a_checkpoint_is_a_usage_error(archive, tmp_path) -> None:
    manifest = write_manifest(tmp_path, qido(archive.url))
    for command in ("verify", "report"):
        result = trolley(command, str(manifest))
        assert result.returncode == 2 and "nothing has run yet" in result.stderr


# --- secrets -----------------------------------------------------------------------------------


def test_no_secret_in_lock_logs_reports_or_output(orthanc_auth, tmp_path) -> None:
    search = (
        f'{{backend: qido-rs, url: "{orthanc_auth.dicomweb_url}", '
        "auth: {type: basic, username_env: AUDIT_USER, password_env: AUDIT_PASSWORD}}"
    )
    manifest = write_manifest(tmp_path, search, patients="*")
    env = {"AUDIT_USER": "alice", "AUDIT_PASSWORD": "s3cret-pass"}
    outputs = []
    for command in (
        ["lock"],
        ["run"],
        ["report"],
        ["report", "--format", "csv"],
        ["verify"],
        ["verify", "--format", "json"],
    ):
        result = trolley(*command, str(manifest), env=env)
        assert result.returncode == 0, f"{command}: {result.stderr}"
        outputs.append(result.stdout + result.stderr)
    root = tmp_path / "data"
    (root / data_files(root).popitem()[0]).unlink()
    repaired = trolley("verify", "--repair", str(manifest), env=env)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    outputs.append(repaired.stdout + repaired.stderr)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".dcm"]
    assert any(p.name == "pull.yaml.lock.json" for p in written)
    assert any(p.parent.name == "reports" for p in written)
    texts = outputs + [p.read_text(errors="replace") for p in written if p.suffix != ".sqlite"]
    with sqlite3.connect(root / ".trolley" / "checkpoint.sqlite") as db:
        texts += [
            repr(row)
            for table in ("meta", "runs", "files", "studies", "items")
            for row in db.execute(f"SELECT * FROM {table}")
        ]
    basic = base64.b64encode(b"alice:s3cret-pass").decode()
    for text in texts:
        assert "s3cret-pass" not in text and basic not in text
    audit = json.loads(_json_prefix(outputs[2]))
    assert audit["runs"][0]["search"] == f"qido-rs {orthanc_auth.dicomweb_url}"


def _json_prefix(text: str) -> str:
    """The JSON document at the start of stdout+stderr (stderr follows it)."""
    decoder = json.JSONDecoder()
    _, end = decoder.raw_decode(text)
    return text[:end]


# --- checkpoint migration ----------------------------------------------------------------------


def test_a_checkpoint_from_before_the_audit_columns_is_migrated(tmp_path) -> None:
    path = tmp_path / "checkpoint.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE runs (run_id TEXT PRIMARY KEY, started_at TEXT NOT NULL,
                finished_at TEXT, status TEXT NOT NULL, manifest_hash TEXT NOT NULL, summary TEXT);
            CREATE TABLE files (sop_instance_uid TEXT PRIMARY KEY, item_id INTEGER NOT NULL,
                study_uid TEXT NOT NULL, series_uid TEXT NOT NULL, path TEXT NOT NULL,
                size INTEGER NOT NULL, sha256 TEXT NOT NULL, transfer_syntax TEXT,
                sop_class_uid TEXT, source TEXT, stored_at TEXT NOT NULL);
            INSERT INTO runs VALUES ('old', '2024', '2024', 'complete', 'h', NULL);
            INSERT INTO files VALUES ('1.2.3', 1, '1', '1.2', 'a.dcm', 3, 'x', '', '', '', 't');
            """
        )
    checkpoint = Checkpoint(path)
    try:
        (old,) = checkpoint.files()
        assert old["path"] == "a.dcm" and old["modality"] is None and old["run_id"] is None
        assert checkpoint.runs()[0]["provenance"] is None
    finally:
        checkpoint.close()
