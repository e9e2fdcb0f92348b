"""Vitrea and IMPAX session logins, against login gates that answer as those products do
(trolley_etl._harness.vendor_login) in front of the real Orthanc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl import Query, StorageDir, Trolley
from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS
from trolley_etl._harness.vendor_login import VendorLoginProxy
from trolley_etl.backends import QidoRS, WadoRS
from trolley_etl.backends.session_auth import ImpaxAuth, SessionAuth, VitreaAuth
from trolley_etl.core.errors import AuthenticationError

USERS = {"radiology": "correct horse battery"}
PASSWORD = USERS["radiology"]
STUDIES = [COHORT_ACCESSIONS[a] for a in ("ACC1001", "ACC1002")]
INSTANCES = sum(s.instance_count for s in STUDIES)


@pytest.fixture
def vitrea(orthanc) -> Iterator[VendorLoginProxy]:
    with VendorLoginProxy(orthanc.url, "vitrea", USERS) as proxy:
        yield proxy


@pytest.fixture
def impax(orthanc) -> Iterator[VendorLoginProxy]:
    with VendorLoginProxy(orthanc.url, "impax", USERS) as proxy:
        yield proxy


def auth_for(proxy: VendorLoginProxy, password: str = PASSWORD) -> SessionAuth:
    if proxy.product == "vitrea":
        return VitreaAuth(proxy.login_url, "radiology", password)
    return ImpaxAuth(proxy.login_url, "radiology", password)


def pull(proxy: VendorLoginProxy, auth: SessionAuth, root: Path, workers: int = 4) -> set[str]:
    """Search and download both studies through the gate; the stored SOP instance UIDs."""
    url = f"{proxy.url}/dicom-web"
    trolley = Trolley(
        searcher=QidoRS(url, auth=auth),
        downloader=WadoRS(url, auth=auth),
        storage=StorageDir(root),
        workers=workers,
    )
    with trolley:
        studies = [trolley.find_study(Query(AccessionNumber=s.accession_number)) for s in STUDIES]
        series = [trolley.ensure_level([study], _series_level())[0] for study in studies]
        stored = trolley.download(series)  # one retrieval per series, in parallel
    return {s.sop_instance_uid for s in stored}


def _series_level():
    from trolley_etl.core.model import QueryLevel

    return QueryLevel.SERIES


@pytest.mark.archive
@pytest.mark.parametrize("product", ["vitrea", "impax"])
def test_one_login_shared_by_searcher_downloader_and_workers(product, request, tmp_path):
    proxy: VendorLoginProxy = request.getfixturevalue(product)
    auth = auth_for(proxy)
    stored = pull(proxy, auth, tmp_path)
    assert len(stored) == INSTANCES
    assert proxy.logins == ["radiology"]
    assert auth.logins == 1
    assert len(proxy.seen_headers) > 4  # searches and downloads all went through the session


@pytest.mark.parametrize("product", ["vitrea", "impax"])
def test_a_session_that_expires_mid_run_is_renewed(product, orthanc, tmp_path):
    """Each session ends after 2 requests: the pull logs in again as often as needed and
    every instance arrives."""
    with VendorLoginProxy(orthanc.url, product, USERS, session_requests=2) as proxy:
        auth = auth_for(proxy)
        stored = pull(proxy, auth, tmp_path, workers=2)
        assert len(stored) == INSTANCES
        assert proxy.ended_sessions >= 2
        assert auth.logins == len(proxy.logins) >= 3
        # one renewal per ended session at most: the workers do not each log in again
        assert len(proxy.logins) <= proxy.ended_sessions + 1


@pytest.mark.archive
@pytest.mark.parametrize("product", ["vitrea", "impax"])
def test_sessions_ended_by_the_archive_are_renewed_once(product, request, tmp_path):
    proxy: VendorLoginProxy = request.getfixturevalue(product)
    auth = auth_for(proxy)
    qido = QidoRS(f"{proxy.url}/dicom-web", auth=auth)
    assert qido.search(Query(AccessionNumber="ACC1001"))
    proxy.end_sessions()  # an idle timeout on the archive's side
    assert qido.search(Query(AccessionNumber="ACC1002"))
    assert auth.logins == 2 == len(proxy.logins)


@pytest.mark.archive
@pytest.mark.parametrize("product", ["vitrea", "impax"])
def test_a_refused_login_is_an_authentication_error_without_secrets(product, request):
    proxy: VendorLoginProxy = request.getfixturevalue(product)
    auth = auth_for(proxy, password="wrong password")
    qido = QidoRS(f"{proxy.url}/dicom-web", auth=auth)
    with pytest.raises(AuthenticationError, match="refused the login") as caught:
        qido.search(Query(AccessionNumber="ACC1001"))
    assert "wrong password" not in str(caught.value)
    assert "wrong password" not in repr(auth)
    assert proxy.refused_logins == 1
    assert proxy.logins == []


def test_impax_login_failed_page_is_named(impax):
    auth = auth_for(impax, password="nope")
    with pytest.raises(AuthenticationError, match="Login Failed"):
        auth.ensure_login()


def test_an_unreachable_login_is_a_connection_error():
    from trolley_etl._harness.orthanc import free_port
    from trolley_etl.core.errors import ConnectionFailedError

    auth = VitreaAuth(f"http://127.0.0.1:{free_port()}/login", "radiology", PASSWORD)
    with pytest.raises(ConnectionFailedError, match="cannot reach the Vitrea login"):
        auth.ensure_login()


# --- through the command line ------------------------------------------------------------


def write_manifest(folder: Path, proxy: VendorLoginProxy) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    realm = "\n      realm: DefaultSystemRealm" if proxy.product == "vitrea" else ""
    auth = f"""
    auth:
      type: {proxy.product}
      login_url: {proxy.login_url}
      username_env: ARCHIVE_USER
      password_env: ARCHIVE_PASSWORD{realm}"""
    path = folder / "vendor.yaml"
    path.write_text(
        f"""\
version: 1
name: vendor-login
source:
  search:
    backend: qido-rs
    url: {proxy.url}/dicom-web{auth}
  download:
    backend: wado-rs
    url: {proxy.url}/dicom-web{auth}
queries:
  - name: two
    filters: {{PatientID: TRL001}}
storage:
  root: ./data
run:
  workers: 3
  retries: 0
"""
    )
    return path


def run_cli(manifest: Path, password: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ARCHIVE_USER": "radiology",
        "ARCHIVE_PASSWORD": password,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", "run", str(manifest), "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.archive
@pytest.mark.parametrize("product", ["vitrea", "impax"])
def test_cli_refused_login_exits_3_with_one_line(product, request, tmp_path):
    proxy: VendorLoginProxy = request.getfixturevalue(product)
    result = run_cli(write_manifest(tmp_path, proxy), "wrong password")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    errors = [json.loads(line) for line in result.stderr.splitlines() if '"error"' in line]
    assert len(errors) == 1, result.stderr
    assert errors[0]["error_type"] == "AuthenticationError"
    assert errors[0]["error"].startswith(proxy.login_url)
    assert "refused the login" in errors[0]["error"]
    assert "wrong password" not in result.stderr
    assert proxy.refused_logins == 1  # the search and the download share one login attempt


@pytest.mark.parametrize("product", ["vitrea", "impax"])
def test_cli_run_survives_session_expiry_and_never_logs_secrets(product, orthanc, tmp_path):
    with VendorLoginProxy(orthanc.url, product, USERS, session_requests=2) as proxy:
        manifest = write_manifest(tmp_path, proxy)
        result = run_cli(manifest, PASSWORD)
        assert result.returncode == 0, result.stderr
        assert proxy.ended_sessions >= 1 and len(proxy.logins) >= 2
        stored = [p for p in (tmp_path / "data").rglob("*.dcm")]
        assert len(stored) == INSTANCES
        logs = result.stderr + "".join(
            p.read_text() for p in (tmp_path / "data" / ".trolley").rglob("*.jsonl")
        )
        cookies = {h.get("Cookie", "") for h in proxy.seen_headers}
        session_ids = {c.split("JSESSIONID=")[-1] for c in cookies if "JSESSIONID=" in c}
        assert session_ids
        assert PASSWORD not in logs
        assert not [s for s in session_ids if s in logs]


@pytest.mark.parametrize("product", ["vitrea", "impax"])
def test_an_expired_session_cookie_is_renewed_before_the_request(product, orthanc):
    """The session cookie says when it ends (Max-Age): the next request logs in first instead
    of being answered as logged out."""
    # Max-Age 2, not 1: the cookie jar counts expiry from the whole second of the login, so a
    # 1-second cookie lived anywhere from 0 to 1 s and could end inside the first search
    with VendorLoginProxy(orthanc.url, product, USERS, cookie_max_age=2) as proxy:
        auth = auth_for(proxy)
        qido = QidoRS(f"{proxy.url}/dicom-web", auth=auth)
        assert qido.search(Query(AccessionNumber="ACC1001"))
        time.sleep(2.2)
        assert qido.search(Query(AccessionNumber="ACC1002"))
        assert auth.logins == 2 == len(proxy.logins)
        assert proxy.unauthenticated == 0
