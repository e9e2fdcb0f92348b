"""`trolley-etl doctor` against a real Orthanc: a healthy archive and each broken setting."""

from __future__ import annotations

import email.utils
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import GeneratedInstance
from trolley_etl._harness.orthanc import OrthancServer, free_port
from trolley_etl.cli.main import main

USERS = {"doctor": "correct-horse"}
MOVE_AET = "DOCTORMOVE"


@pytest.fixture(scope="module")
def strict(
    tmp_path_factory: pytest.TempPathFactory, cohort: list[GeneratedInstance]
) -> Iterator[OrthancServer]:
    """An Orthanc that checks the called AE title and asks for HTTP credentials."""
    server = OrthancServer(
        tmp_path_factory.mktemp("orthanc-doctor"), users=USERS, check_called_aet=True
    ).start()
    try:
        first = cohort[0].study_uid
        server.upload_many(c.data for c in cohort if c.study_uid == first)
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOC_USER", "doctor")
    monkeypatch.setenv("DOC_PASSWORD", "correct-horse")


def write(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(
        f"""\
version: 1
name: doctor-test
source:
{source}
queries:
  - name: q
    filters: {{AccessionNumber: ACC1001}}
storage:
  root: ./data
"""
    )
    return path


def doctor(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["doctor", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def http_source(url: str) -> str:
    auth = "{type: basic, username_env: DOC_USER, password_env: DOC_PASSWORD}"
    return f"""\
  search: {{backend: qido-rs, url: "{url}/dicom-web", auth: {auth}}}
  download: {{backend: wado-rs, url: "{url}/dicom-web", auth: {auth}}}"""


def dimse_source(
    server: OrthancServer,
    *,
    port: int | None = None,
    aet: str | None = None,
    download: str = "{backend: c-get}",
) -> str:
    where = f"host: 127.0.0.1, port: {port or server.dicom_port}, called_aet: {aet or server.aet}"
    download = download.replace("{backend:", "{" + where + ", backend:")
    return f"""\
  search: {{backend: dicom-qr, {where}}}
  download: {download}"""


@pytest.mark.archive
def test_healthy_dicomweb_archive(strict: OrthancServer, tmp_path: Path, capsys) -> None:
    code, out = doctor(write(tmp_path, http_source(strict.url)), capsys)
    assert code == 0, out
    for expected in (
        "ok    search    address",
        "ok    search    port",
        "skip  search    clock        the server sends no Date header",  # Orthanc
        "basic credentials accepted",
        "ok    search    search",
        "ok    download  wado-rs      wado-rs delivered 1 instance(s)",
        "every check passed",
    ):
        assert expected in out, out


@pytest.mark.archive
def test_healthy_dimse_archive_with_c_get(strict: OrthancServer, tmp_path: Path, capsys) -> None:
    code, out = doctor(write(tmp_path, dimse_source(strict)), capsys)
    assert code == 0, out
    assert "C-ECHO succeeded" in out
    assert "storage roles negotiated for all 10 common image classes" in out
    assert "c-get delivered 1 instance(s)" in out


@pytest.mark.archive
def test_c_move_destination_known_and_unknown(
    strict: OrthancServer, tmp_path: Path, capsys
) -> None:
    port = free_port()
    strict.add_modality(MOVE_AET, MOVE_AET, "127.0.0.1", port)
    known = f"{{backend: c-move, move_destination: {{aet: {MOVE_AET}, port: {port}}}}}"
    code, out = doctor(write(tmp_path, dimse_source(strict, download=known)), capsys)
    assert code == 0, out
    assert "c-move delivered 1 instance(s)" in out
    unknown = f"{{backend: c-move, move_destination: {{aet: NOBODY, port: {free_port()}}}}}"
    code, out = doctor(write(tmp_path, dimse_source(strict, download=unknown)), capsys)
    assert code == 3, out
    line = next(x for x in out.splitlines() if x.startswith("FAIL  download  c-move"))
    assert "the archive must know AE 'NOBODY'" in line


@pytest.mark.archive
def test_wrong_port(strict: OrthancServer, tmp_path: Path, capsys) -> None:
    code, out = doctor(write(tmp_path, dimse_source(strict, port=free_port())), capsys)
    assert code == 3
    line = next(x for x in out.splitlines() if x.startswith("FAIL  search    port"))
    assert "does not answer" in line and "fix: check the port" in line
    assert "skip  search    dicom-qr     skipped: the archive cannot be reached" in out


@pytest.mark.archive
def test_wrong_called_ae(strict: OrthancServer, tmp_path: Path, capsys) -> None:
    code, out = doctor(write(tmp_path, dimse_source(strict, aet="NOTORTHANC")), capsys)
    assert code == 3
    line = next(x for x in out.splitlines() if x.startswith("FAIL  search    c-echo"))
    assert "association rejected" in line and "be called 'NOTORTHANC'" in line, out


@pytest.mark.archive
def test_bad_credentials(
    strict: OrthancServer, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOC_PASSWORD", "wrong")
    code, out = doctor(write(tmp_path, http_source(strict.url)), capsys)
    assert code == 3
    line = next(x for x in out.splitlines() if x.startswith("FAIL  search    credentials"))
    assert "HTTP 401" in line and "check the credentials in DOC_USER, DOC_PASSWORD" in line


def test_unknown_host_and_manifest_errors(tmp_path: Path, capsys) -> None:
    code, out = doctor(write(tmp_path, http_source("http://no-such-archive.invalid")), capsys)
    assert code == 3
    assert "FAIL  search    address      no-such-archive.invalid does not resolve" in out
    (tmp_path / "bad.yaml").write_text("version: 1\nname: x\n")
    assert main(["doctor", str(tmp_path / "bad.yaml")]) == 2


class DatedServer:
    """A QIDO-RS stand-in that answers no study, with a Date header `skew` seconds off."""

    def __init__(self, skew: float) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"[]"
                self.send_response(200)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def date_time_string(self, timestamp: float | None = None) -> str:
                return email.utils.formatdate(time.time() + skew, usegmt=True)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.archive
@pytest.mark.parametrize(("skew", "status", "exit_code"), [(2, "ok  ", 0), (-600, "FAIL", 3)])
def test_clock_skew_against_the_date_header(
    tmp_path: Path, capsys, skew: float, status: str, exit_code: int
) -> None:
    server = DatedServer(skew)
    try:
        source = f"  search: {{backend: qido-rs, url: {server.url}/dicom-web}}"
        code, out = doctor(write(tmp_path, source), capsys)
    finally:
        server.close()
    line = next(x for x in out.splitlines() if "clock" in x)
    assert line.startswith(f"{status}  search    clock"), out
    assert code == exit_code
    if skew < 0:
        assert re.search(r"this machine is 60[01] s ahead of the server", line) and "NTP" in line
