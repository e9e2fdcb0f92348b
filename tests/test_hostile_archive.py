"""What a hostile or broken archive sends is checked, bounded and reported (issue 13).

No installable archive sends another study's instance, rows with `../` UIDs or a body one
byte every few seconds, so these tests use small HTTP servers on 127.0.0.1 (pytest-httpserver
for whole answers, a raw socket server for trickling ones).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from trolley_etl import Query, StorageDir, Trolley
from trolley_etl._harness.dicomgen import GeneratedInstance, make_instance, test_uid
from trolley_etl.backends import QidoRS, WadoRS, WadoURI
from trolley_etl.backends.http import HttpClient, abort_transfers, iter_body
from trolley_etl.core.arrival import CheckedSink
from trolley_etl.core.backend import write_instance
from trolley_etl.core.errors import (
    BackendError,
    ConnectionFailedError,
    DownloadError,
    ObjectTooLargeError,
    ResponseFormatError,
    UnexpectedInstanceError,
)
from trolley_etl.core.model import InstanceReference, StudyReference
from trolley_etl.core.uids import rejected_rows

STUDY = test_uid("hostile", "study")
SERIES = test_uid("hostile", "series")
OTHER_STUDY = test_uid("hostile", "other-study")


def instance(
    sop: str, *, study: str = STUDY, series: str = SERIES, rows: int = 8, description: str = ""
) -> GeneratedInstance:
    return make_instance(
        patient_id="P1",
        patient_name="Test^Hostile",
        study_uid=study,
        series_uid=series,
        sop_uid=sop,
        modality="CT",
        study_date="20240101",
        accession_number="ACC1",
        rows=rows,
        columns=8,
        series_description=description,
    )


def multipart(*parts: bytes, boundary: str = "b0undary") -> Response:
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
        for p in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return Response(body, headers={"Content-Type": content_type})


def stored_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.dcm") if ".trolley" not in p.parts]


# --- what arrives is checked against what was asked ------------------------------------------


def test_wado_rs_answer_with_another_studys_instance_is_refused(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    mine, foreign = instance(test_uid("h", 1)), instance(test_uid("h", 2), study=OTHER_STUDY)
    httpserver.expect_request(f"/dicom-web/studies/{STUDY}").respond_with_response(
        multipart(mine.data, foreign.data)
    )
    trolley = Trolley(downloader=WadoRS(httpserver.url_for("/dicom-web")))
    with pytest.raises(DownloadError) as info:
        trolley.download(StudyReference(STUDY), output_dir=tmp_path)
    error = info.value.failures[0][1]
    assert isinstance(error, UnexpectedInstanceError)
    assert OTHER_STUDY in str(error)
    stored = stored_files(tmp_path)
    assert [p.name for p in stored] == [f"{mine.sop_uid}.dcm"]  # nothing foreign on disk
    assert OTHER_STUDY not in {p.parent.parent.name for p in stored}
    assert not list((tmp_path / ".trolley" / "tmp").glob("*"))


def test_wado_uri_server_answering_every_request_with_one_instance(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    first, second = instance(test_uid("u", 1)), instance(test_uid("u", 2))
    httpserver.expect_request("/wado").respond_with_data(
        first.data, content_type="application/dicom"
    )
    refs = [InstanceReference(STUDY, SERIES, i.sop_uid) for i in (first, second)]
    trolley = Trolley(downloader=WadoURI(httpserver.url_for("/wado")))
    with pytest.raises(DownloadError) as info:
        trolley.download(refs, output_dir=tmp_path)
    assert [ref for ref, _ in info.value.failures] == [refs[1]]  # item 2 never maps to file 1
    assert "SOPInstanceUID" in str(info.value.failures[0][1])
    assert [p.name for p in stored_files(tmp_path)] == [f"{first.sop_uid}.dcm"]


def test_same_sop_instance_twice_with_different_content_is_an_error(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    sop = test_uid("dup", 1)
    one, other = instance(sop, description="one"), instance(sop, description="other")
    assert one.data != other.data
    httpserver.expect_request(f"/dicom-web/studies/{STUDY}").respond_with_response(
        multipart(one.data, other.data)
    )
    trolley = Trolley(downloader=WadoRS(httpserver.url_for("/dicom-web")))
    with pytest.raises(DownloadError, match="twice with different content"):
        trolley.download(StudyReference(STUDY), output_dir=tmp_path)


def test_same_sop_instance_twice_with_the_same_bytes_is_harmless(tmp_path: Path) -> None:
    one = instance(test_uid("same", 1))
    sink = CheckedSink(StorageDir(tmp_path), StudyReference(STUDY))
    write_instance(sink, one.data)
    write_instance(sink, one.data)
    assert len(stored_files(tmp_path)) == 1


def test_dimse_style_whole_objects_are_checked_too(tmp_path: Path) -> None:
    """C-GET and C-MOVE hand whole objects to the sink (write_instance): same checks."""
    sink = CheckedSink(StorageDir(tmp_path), StudyReference(STUDY))
    with pytest.raises(UnexpectedInstanceError):
        write_instance(sink, instance(test_uid("d", 1), study=OTHER_STUDY).data)
    with pytest.raises(UnexpectedInstanceError, match="received object"):
        write_instance(sink, b"not dicom at all" * 100)
    assert stored_files(tmp_path) == []
    assert not list((tmp_path / ".trolley" / "tmp").glob("*"))


def test_object_larger_than_the_limit_is_cut_off(tmp_path: Path) -> None:
    big = instance(test_uid("big", 1), rows=64)
    sink = CheckedSink(StorageDir(tmp_path), StudyReference(STUDY), max_object_bytes=1024)
    with pytest.raises(ObjectTooLargeError):
        write_instance(sink, big.data)
    assert stored_files(tmp_path) == []
    assert not list((tmp_path / ".trolley" / "tmp").glob("*"))


# --- search rows are validated before any UID is used ------------------------------------------


def _row(uid_value: object, vr: str = "UI") -> dict:
    element: dict = {"vr": vr}
    if uid_value is not None:
        element["Value"] = uid_value
    return {"0020000D": element, "00080050": {"vr": "SH", "Value": ["ACC"]}}


BAD_ROWS = {
    "missing": {"00080050": {"vr": "SH", "Value": ["ACC"]}},
    "no value": _row(None),
    "null value": _row([None]),
    "traversal": _row(["../../../../etc"]),
    "traversal inside": _row(["1.2/../../x"]),
    "two values": _row(["1.2.3", "1.2.3.4"]),
    "nul byte": _row(["1.2.3\x00/../x"]),
    "too long": _row(["1." + "2" * 70]),
}


@pytest.mark.filterwarnings("ignore:.*VR UI:UserWarning")  # pydicom notices the bad values too
def test_search_rows_with_invalid_uids_are_reported_and_never_fetched(
    httpserver: HTTPServer, tmp_path: Path
) -> None:
    good = instance(test_uid("good", 1))
    rows = [*BAD_ROWS.values(), _row([STUDY])]
    httpserver.expect_request("/dicom-web/studies", method="GET").respond_with_json(rows)
    httpserver.expect_request(f"/dicom-web/studies/{STUDY}").respond_with_response(
        multipart(good.data)
    )
    rejected_rows.drain()
    trolley = Trolley(
        searcher=QidoRS(httpserver.url_for("/dicom-web")),
        downloader=WadoRS(httpserver.url_for("/dicom-web")),
    )
    studies = trolley.find_studies(Query(AccessionNumber="ACC"))
    assert [s.uid for s in studies] == [STUDY]
    reported = rejected_rows.drain()
    assert len(reported) == len(BAD_ROWS)
    assert all(r["level"] == "study" and r["reason"] for r in reported)
    trolley.download(studies, output_dir=tmp_path)
    asked = [request.path for request, _ in httpserver.log]
    assert asked == ["/dicom-web/studies", f"/dicom-web/studies/{STUDY}"]


@pytest.mark.parametrize(
    "body",
    [
        b'[1,"x",null]',
        b"[" * 5000 + b"]" * 5000,
        b"{not json",
        b'{"a": 1}',
        b'[{"0020000D": 5}]',
        b'[{"0020000D": {"vr": "UI", "Value": [5]}}]',
    ],
    ids=["scalars", "deep nesting", "not json", "object", "bad element", "bad value"],
)
def test_garbage_search_answers_are_format_errors(httpserver: HTTPServer, body: bytes) -> None:
    httpserver.expect_request("/dicom-web/studies").respond_with_data(
        body, content_type="application/dicom+json"
    )
    with pytest.raises(ResponseFormatError):
        QidoRS(httpserver.url_for("/dicom-web")).search(Query(AccessionNumber="A"))


def test_references_with_invalid_uids_never_become_requests(httpserver: HTTPServer) -> None:
    for downloader in (WadoRS(httpserver.url_for("/d")), WadoURI(httpserver.url_for("/w"))):
        for ref in (
            InstanceReference("../../etc", SERIES, "1.2"),
            InstanceReference(STUDY, "1.2/../../x", "1.2"),
            InstanceReference(STUDY, SERIES, ""),
        ):
            with pytest.raises(ValueError, match="not a valid DICOM UID"):
                downloader.fetch(ref, StorageDir("/nonexistent"))
    assert httpserver.log == []


# --- bounds ----------------------------------------------------------------------------------


def test_search_that_ignores_offset_stops_at_the_repeated_page(httpserver: HTTPServer) -> None:
    page = [_row([test_uid("page", i)]) for i in range(3)]
    httpserver.expect_request("/dicom-web/studies").respond_with_json(page)
    qido = QidoRS(httpserver.url_for("/dicom-web"), page_size=3)
    with pytest.raises(ResponseFormatError, match="ignores offset"):
        qido.search(Query(AccessionNumber="A"))
    assert len(httpserver.log) == 2


def test_search_page_count_is_bounded(httpserver: HTTPServer) -> None:
    def handler(request: Request) -> Response:
        offset = int(request.args.get("offset", 0))
        return Response(
            json.dumps([_row([test_uid("p", offset)])]), content_type="application/dicom+json"
        )

    httpserver.expect_request("/dicom-web/studies").respond_with_handler(handler)
    qido = QidoRS(httpserver.url_for("/dicom-web"), page_size=1, max_pages=5)
    with pytest.raises(ResponseFormatError, match="5 pages"):
        qido.search(Query(AccessionNumber="A"))
    assert len(httpserver.log) == 5


def test_search_answer_size_is_bounded(httpserver: HTTPServer) -> None:
    rows = [_row([test_uid("big", i)]) for i in range(2000)]
    httpserver.expect_request("/dicom-web/studies").respond_with_json(rows)
    qido = QidoRS(httpserver.url_for("/dicom-web"), max_answer_bytes=10_000)
    with pytest.raises(ResponseFormatError, match="larger than"):
        qido.search(Query(AccessionNumber="A"))


class TricklingServer:
    """Sends headers and then one body byte every `interval` seconds, forever."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom\r\n"
                b"Content-Length: 100000000\r\n\r\n"
            )
            for _ in range(int(60 / self.interval)):  # bounded, whatever happens
                if self.stop.wait(self.interval):
                    return
                try:
                    conn.sendall(b"x")
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@pytest.fixture()
def trickling() -> Iterator[TricklingServer]:
    server = TricklingServer(interval=0.3)
    yield server
    server.close()


@pytest.mark.archive
def test_a_trickling_body_hits_the_total_deadline(trickling: TricklingServer) -> None:
    client = HttpClient(trickling.url, timeout=(2, 5), deadline=1.5)
    started = time.monotonic()
    response = client.get("/x", stream=True)
    with pytest.raises(ConnectionFailedError, match=r"deadline of 1\.5 s"):
        for _ in iter_body(response, trickling.url):
            pass
    assert time.monotonic() - started < 4  # the idle timeout never fires: bytes keep coming


@pytest.mark.archive
def test_abort_transfers_unblocks_a_stalled_read_at_once(trickling: TricklingServer) -> None:
    trickling.interval = 30  # stalled: nothing after the headers
    client = HttpClient(trickling.url, timeout=(2, 60), deadline=None)
    response = client.get("/x", stream=True)
    client.deadline = 600
    failure: list[BaseException] = []

    def read() -> None:
        try:
            for _ in iter_body(response, trickling.url):
                pass
        except BaseException as exc:
            failure.append(exc)

    # watched only when a deadline is set; watch this one explicitly
    from trolley_etl.backends.http import WATCHDOG

    WATCHDOG.watch(response, time.monotonic() + 600, 600)
    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert abort_transfers() == 1
    reader.join(timeout=5)
    assert not reader.is_alive()
    assert time.monotonic() - started < 2
    assert isinstance(failure[0], ConnectionFailedError)
    assert "interrupted" in str(failure[0])


# --- credentials that cannot be sent ----------------------------------------------------------


def test_a_token_with_a_line_break_is_refused_without_printing_it(
    httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trolley_etl.backends.http import auth_from_env

    monkeypatch.setenv("TOKEN", "sekrit-token-value\r")
    client = HttpClient(httpserver.url_for("/"), auth=auth_from_env("bearer", token_env="TOKEN"))
    with pytest.raises(BackendError) as info:
        client.get("/x")
    assert "sekrit" not in str(info.value)
    assert "cannot be sent" in str(info.value)


def test_a_non_latin1_password_is_a_clear_error(
    httpserver: HTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trolley_etl.backends.http import auth_from_env

    monkeypatch.setenv("U", "alice")
    monkeypatch.setenv("P", "пароль-sekrit")
    auth = auth_from_env("basic", username_env="U", password_env="P")
    client = HttpClient(httpserver.url_for("/"), auth=auth)
    with pytest.raises(BackendError, match="cannot be sent") as info:
        client.get("/x")
    assert "sekrit" not in str(info.value)


def test_sigterm_during_a_stalled_download_stops_the_run_within_seconds(
    httpserver: HTTPServer, trickling: TricklingServer, tmp_path: Path
) -> None:
    import signal
    import subprocess
    import sys

    trickling.interval = 30  # headers, then nothing
    counted = {**_row([STUDY]), "00201208": {"vr": "IS", "Value": [1]}}  # what it holds
    httpserver.expect_request("/dicom-web/studies").respond_with_json([counted])
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""\
version: 1
name: stalled
source:
  search: {{backend: qido-rs, url: "{httpserver.url_for("/dicom-web")}"}}
  download: {{backend: wado-rs, url: "{trickling.url}/dicom-web"}}
queries:
  - name: q
    study_uids: ["{STUDY}"]
storage:
  root: ./data
""")
    process = subprocess.Popen(
        [sys.executable, "-m", "trolley_etl", "run", str(manifest), "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if '"step": "download"' in line and '"step.start"' in line:
            break
    time.sleep(1.0)  # the worker is now blocked reading the stalled body
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=60)
    assert process.returncode == 130
    assert time.monotonic() - started < 5  # not the 300 s read timeout


def test_a_run_with_rejected_rows_is_not_complete(httpserver: HTTPServer, tmp_path: Path) -> None:
    import subprocess
    import sys

    good = instance(test_uid("run-good", 1))
    counted = {**_row([STUDY]), "00201208": {"vr": "IS", "Value": [1]}}  # what it holds
    httpserver.expect_request("/dicom-web/studies", method="GET").respond_with_json(
        [counted, BAD_ROWS["traversal"]]
    )
    httpserver.expect_request(f"/dicom-web/studies/{STUDY}").respond_with_response(
        multipart(good.data)
    )
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""\
version: 1
name: rejected
source:
  search: {{backend: qido-rs, url: "{httpserver.url_for("/dicom-web")}"}}
queries:
  - name: q
    filters: {{AccessionNumber: ACC}}
storage:
  root: ./data
""")

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "trolley_etl", "run", str(manifest), "--log-format", "json"],
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = run()
    assert first.returncode == 1, first.stderr  # the cohort is not complete: never exit 0
    invalid = [json.loads(x) for x in first.stderr.splitlines() if "search.invalid_row" in x]
    assert len(invalid) == 1 and "../../../../etc" in invalid[0]["StudyInstanceUID"]
    assert len(stored_files(tmp_path / "data")) == 1
    report = json.loads(
        sorted((tmp_path / "data" / ".trolley" / "reports").glob("*.json"))[-1].read_text()
    )
    assert report["runs"][-1]["invalid_search_row_count"] == 1
    again = run()
    assert again.returncode == 1  # resumed without searching: still not complete
