"""Ordinary failures are one line and a documented exit code, never a traceback (issue 13)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer

from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl.cli import main
from trolley_etl.core.arrival import CheckedSink
from trolley_etl.core.backend import write_instance
from trolley_etl.core.errors import DiskFullError
from trolley_etl.core.model import StudyReference

STUDIES = [test_uid("disk", s) for s in range(2)]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env=dict(os.environ),
    )


def write_manifest(folder: Path, url: str, root: Path, uids: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pull.yaml"
    path.write_text(
        f"""\
version: 1
name: failures
source:
  search: {{backend: qido-rs, url: "{url}/dicom-web"}}
queries:
  - name: q
    study_uids: {json.dumps(uids)}
storage:
  root: {root}
run:
  workers: 1
  retries: 1
"""
    )
    return path


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr


# --- a full disk ---------------------------------------------------------------------------------


class _FullSink:
    def open_instance(self):  # a writer whose disk is full
        class Writer:
            def write(self, chunk: bytes) -> None:
                raise OSError(errno.ENOSPC, "No space left on device", "/data/x.part")

            def commit(self) -> None: ...

            def abort(self) -> None: ...

        return Writer()


def test_enospc_becomes_a_disk_full_error_naming_the_root(tmp_path: Path) -> None:
    one = make_instance(
        patient_id="P",
        patient_name="N",
        study_uid=STUDIES[0],
        series_uid=test_uid("s"),
        sop_uid=test_uid("i"),
        modality="CT",
        study_date="20240101",
        accession_number="A",
    )
    sink = CheckedSink(_FullSink(), StudyReference(STUDIES[0]), root=tmp_path)
    with pytest.raises(DiskFullError, match=rf"disk holding {tmp_path} \(.* MiB free\)"):
        write_instance(sink, one.data)


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs (needs the right to mount, as root in CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.archive
def test_full_disk_stops_the_run_with_one_line_and_the_rerun_completes(
    tmp_path: Path, small_disk: Path
) -> None:
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        for study in STUDIES:  # 2 studies of 4 x 512 KiB: more than the 3 MiB disk holds
            for number in range(4):
                server.upload(
                    make_instance(
                        patient_id="P",
                        patient_name="N",
                        study_uid=study,
                        series_uid=test_uid(study, "s"),
                        sop_uid=test_uid(study, number),
                        modality="CT",
                        study_date="20240101",
                        accession_number=f"A{study[-4:]}",
                        rows=512,
                        columns=512,
                        instance_number=number + 1,
                    ).data
                )
        root = small_disk / "data"
        manifest = write_manifest(tmp_path / "m", server.url, root, STUDIES)
        first = cli("run", str(manifest), "--log-format", "json")
        assert first.returncode == 1, first.stderr
        no_traceback(first)
        failed = [json.loads(line) for line in first.stderr.splitlines() if '"run.failed"' in line]
        assert failed and f"no space left on the disk holding {root}" in failed[0]["error"]
        assert "MiB free" in failed[0]["error"]
        assert not list((root / ".trolley" / "tmp").glob("*.part"))
        status = json.loads(cli("status", str(manifest), "--format", "json").stdout)
        assert status["last_run"]["status"] == "failed"  # not left `running`

        subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)
        second = cli("run", str(manifest))
        assert second.returncode == 0, second.stderr
        assert len([p for p in root.rglob("*.dcm") if ".trolley" not in p.parts]) == 8
    finally:
        server.stop()


# --- the storage root and the checkpoint -----------------------------------------------------


@pytest.mark.archive
def test_a_read_only_root_can_be_read_but_not_run_into(tmp_path: Path, small_disk: Path) -> None:
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        for number in range(3):
            server.upload(
                make_instance(
                    patient_id="P",
                    patient_name="N",
                    study_uid=STUDIES[0],
                    series_uid=test_uid("ro", "s"),
                    sop_uid=test_uid("ro", number),
                    modality="CT",
                    study_date="20240101",
                    accession_number="A1",
                    instance_number=number + 1,
                ).data
            )
        root = small_disk / "data"
        manifest = write_manifest(tmp_path / "m", server.url, root, STUDIES[:1])
        assert cli("run", str(manifest)).returncode == 0
    finally:
        server.stop()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for command in (["status"], ["report", "--format", "csv"], ["verify"]):
        result = cli(*command, str(manifest))
        no_traceback(result)
        assert result.returncode == 0, (command, result.stderr)
    assert "3 files checked" in cli("verify", str(manifest)).stdout
    refused = cli("run", str(manifest))
    no_traceback(refused)
    assert refused.returncode == 2
    assert "read-only" in refused.stderr


@pytest.mark.subprocess
def test_a_root_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.write_text("not a folder")
    manifest = write_manifest(tmp_path, "http://127.0.0.1:9", root, STUDIES[:1])
    result = cli("run", str(manifest))
    no_traceback(result)
    assert result.returncode == 2
    assert "a file stands where a folder is needed" in result.stderr


@pytest.mark.subprocess
def test_a_corrupt_checkpoint_is_named_and_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / ".trolley").mkdir(parents=True)
    checkpoint = root / ".trolley" / "checkpoint.sqlite"
    checkpoint.write_bytes(b"this is not a database" * 100)
    before = checkpoint.read_bytes()
    manifest = write_manifest(tmp_path, "http://127.0.0.1:9", root, STUDIES[:1])
    for command in ("status", "run", "report", "verify"):
        result = cli(command, str(manifest))
        no_traceback(result)
        assert result.returncode == 2, (command, result.stderr)
        assert "checkpoint" in result.stderr and "was not changed" in result.stderr
    assert checkpoint.read_bytes() == before


# --- the terminal ----------------------------------------------------------------------------


def test_schema_into_a_missing_folder_is_one_line(tmp_path: Path, capsys) -> None:
    code = main(["schema", "-o", str(tmp_path / "missing" / "schema.json")])
    assert code == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_a_closed_pipe_is_quiet(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`head`) went away
    stdout = os.fdopen(write_end, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        code = main(["schema"])
    finally:
        stdout.close()
    assert code == 141
    assert capsys.readouterr().err == ""


def test_json_logs_keep_stderr_json_even_when_pydicom_objects(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    rows = [
        {"0020000D": {"vr": "UI", "Value": ["../../../../etc"]}},
        {"0020000D": {"vr": "UI", "Value": ["1.2.3", "1.2.3.4"]}},
    ]
    httpserver.expect_request("/dicom-web/studies").respond_with_json(rows)
    manifest = write_manifest(
        tmp_path, httpserver.url_for("").rstrip("/"), tmp_path / "d", STUDIES[:1]
    )
    result = cli("plan", str(manifest), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("{") for line in lines), result.stderr
    invalid = [json.loads(line) for line in lines if '"search.invalid_row"' in line]
    assert len(invalid) == 2 and "not a valid DICOM UID" in invalid[0]["reason"]


def test_a_token_that_cannot_be_sent_is_never_printed(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    manifest = write_manifest(
        tmp_path, httpserver.url_for("").rstrip("/"), tmp_path / "d", STUDIES[:1]
    )
    text = manifest.read_text().replace(
        '/dicom-web"}', '/dicom-web", auth: {type: bearer, token_env: T13_TOKEN}}'
    )
    manifest.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "trolley_etl", "plan", str(manifest), "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "T13_TOKEN": "tok-sekrit-value\r"},
    )
    no_traceback(result)
    assert result.returncode == 3, result.stderr
    assert "sekrit" not in result.stderr and "sekrit" not in result.stdout
    assert "cannot be sent" in result.stderr
    assert httpserver.log == []
