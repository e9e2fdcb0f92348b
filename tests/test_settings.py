"""One settings object per protocol family, shared by the manifest, the backends and the
runner: the manifest entry builds it once, the backend keeps it, and a caller may hand in
its own (an HTTP session included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from pytest_httpserver import HTTPServer

from trolley_etl import ConfigurationError, Query
from trolley_etl.backends.c_get import CGet
from trolley_etl.backends.c_move import CMove, MoveDestination
from trolley_etl.backends.dicom_qr import DicomQR
from trolley_etl.backends.dimse import DimseSettings
from trolley_etl.backends.http import HttpSettings
from trolley_etl.backends.qido_rs import QidoRS
from trolley_etl.backends.wado_rs import WadoRS
from trolley_etl.manifest import load_manifest
from trolley_etl.runner.backends import build_backends

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests"


@pytest.fixture(autouse=True)
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PACS_USER", "PACS_PASSWORD", "PACS_TOKEN", "VNA_TOKEN"):
        monkeypatch.setenv(name, f"value-of-{name}")


def test_a_manifest_http_entry_builds_its_settings_and_describes_itself() -> None:
    manifest = load_manifest(EXAMPLES / "wado-uri-archive.yaml")
    download = manifest.source.effective_download
    settings = download.http_settings()  # type: ignore[union-attr]
    assert isinstance(settings, HttpSettings)
    assert settings.verify == "/etc/ssl/certs/hospital-ca.pem"
    assert settings.timeout[1] == download.timeout  # type: ignore[index, union-attr]
    assert download.describe() == f"wado-uri {settings.describe()}"


def test_the_runner_hands_the_entrys_limits_to_the_backend_it_builds() -> None:
    manifest = load_manifest(EXAMPLES / "dimse-c-move.yaml")
    searcher, downloader = build_backends(manifest)
    assert isinstance(searcher, DicomQR) and isinstance(downloader, CMove)
    entry = manifest.source.search
    expected = entry.dimse_settings()  # type: ignore[union-attr]
    assert searcher.settings == expected  # limits are not compared, everything else is
    assert searcher.settings.limits is not None
    assert searcher.settings.limits.max_connections == entry.max_connections  # type: ignore[union-attr]


def test_dimse_backends_take_settings_or_an_address_not_both() -> None:
    settings = DimseSettings("127.0.0.1", 11112, "PACS", acse_timeout=3)
    assert CGet(settings).settings is settings
    assert DicomQR("127.0.0.1", 11112, "PACS", acse_timeout=3).settings == settings
    with pytest.raises(ConfigurationError, match="either DimseSettings"):
        CGet(settings, 104)
    with pytest.raises(ConfigurationError, match="called AE title"):
        CGet("127.0.0.1")


def test_a_move_destination_checks_its_own_ae_title() -> None:
    with pytest.raises(ConfigurationError, match="not a valid AE title"):
        MoveDestination("A_TITLE_LONGER_THAN_16", 11113)
    with pytest.raises(ConfigurationError, match="port"):
        MoveDestination("TROLLEY", 0)


def test_http_backends_take_settings_or_a_url_not_both() -> None:
    settings = HttpSettings("http://127.0.0.1:9/dicom-web", timeout=(1.0, 2.0))
    assert WadoRS(settings).http.timeout == (1.0, 2.0)
    with pytest.raises(ConfigurationError, match="either HttpSettings"):
        WadoRS(settings, timeout=3.0)


def test_an_injected_session_is_the_one_that_talks_to_the_archive(httpserver: HTTPServer) -> None:
    session = requests.Session()
    session.headers["X-Site-Gateway"] = "ward-7"  # what a caller's own session may carry
    httpserver.expect_request(
        "/dicom-web/studies", headers={"X-Site-Gateway": "ward-7"}
    ).respond_with_json([])
    searcher = QidoRS(HttpSettings(httpserver.url_for("/dicom-web")), session=session)
    assert searcher.http.session is session
    assert searcher.search(Query(PatientID="P1")) == []
    httpserver.check_assertions()
