"""The smaller holes of issue 13: stale atomic temp files, `lock` beside a run, layouts that
cannot tell instances apart, and test/demo archives that would use someone else's port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trolley_etl._harness import demo
from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl._harness.orthanc import OrthancServer, OrthancStartError, free_port
from trolley_etl.runner.run import root_lock

STUDY = test_uid("holes", "study")


def manifest_text(url: str, layout: str = "{StudyInstanceUID}/{SOPInstanceUID}.dcm") -> str:
    return f"""\
version: 1
name: holes
source:
  search: {{backend: qido-rs, url: "{url}/dicom-web"}}
queries:
  - name: q
    study_uids: ["{STUDY}"]
storage:
  root: ./data
  layout: "{layout}"
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


@pytest.mark.subprocess
def test_temp_files_of_a_killed_atomic_write_are_removed_by_the_next_run(tmp_path: Path) -> None:
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        server.upload(
            make_instance(
                patient_id="P",
                patient_name="N",
                study_uid=STUDY,
                series_uid=test_uid("h", "s"),
                sop_uid=test_uid("h", 1),
                modality="CT",
                study_date="20240101",
                accession_number="A",
            ).data
        )
        manifest = tmp_path / "m.yaml"
        manifest.write_text(manifest_text(server.url))
        assert cli("run", str(manifest)).returncode == 0
        root = tmp_path / "data"
        stale = [
            root / ".manifest-sha256.txt.k2j4_x9a.tmp",
            root / ".trolley" / "reports" / ".20240101T000000Z-abc.json.q1w2e3r4.tmp",
        ]
        for path in stale:
            path.write_text("half written")
        mine = root / "notes.tmp"  # not a name write_atomic makes: left alone
        mine.write_text("my own")
        assert cli("run", str(manifest)).returncode == 0
        assert not any(p.exists() for p in stale)
        assert mine.exists()
    finally:
        server.stop()


@pytest.mark.subprocess
def test_lock_refuses_to_run_beside_a_run_of_the_same_root(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(manifest_text("http://127.0.0.1:9"))
    with root_lock(tmp_path / "data"):
        result = cli("lock", str(manifest), "--log-format", "json")
    assert result.returncode == 2, result.stderr
    assert "another trolley-etl run is using" in result.stderr
    assert not (tmp_path / "m.yaml.lock.json").exists()


@pytest.mark.parametrize(
    "layout", ["{StudyInstanceUID}/{SeriesInstanceUID}", "{PatientID}/{InstanceNumber}.dcm"]
)
@pytest.mark.subprocess
def test_validate_warns_about_layouts_that_cannot_tell_instances_apart(
    tmp_path: Path, layout: str
) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text(manifest_text("http://127.0.0.1:9", layout))
    result = cli("validate", str(manifest))
    assert result.returncode == 0
    assert f"{manifest}:10:3: storage.layout: warning: layout {layout!r}" in result.stderr
    manifest.write_text(manifest_text("http://127.0.0.1:9"))
    assert "warning" not in cli("validate", str(manifest)).stderr


class _Other(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"Name": "someone-else"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.archive
def test_a_test_archive_refuses_a_port_another_server_answers_on(tmp_path: Path) -> None:
    other = ThreadingHTTPServer(("127.0.0.1", 0), _Other)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        server = OrthancServer(tmp_path, http_port=other.server_address[1])
        with pytest.raises(OrthancStartError, match="another server already answers"):
            server.start()
        assert not server.running
    finally:
        other.shutdown()
        other.server_close()


@pytest.mark.archive
def test_the_demo_refuses_a_port_in_use(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    port = free_port()
    monkeypatch.setattr(demo, "DEMO_HTTP_PORT", port)
    other = ThreadingHTTPServer(("127.0.0.1", port), _Other)
    try:
        assert demo.main([]) == 2
    finally:
        other.server_close()
    assert f"port {port} is already in use" in capsys.readouterr().err
