"""Every backend a manifest can name is built with the manifest's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from requests.auth import HTTPBasicAuth

from trolley_etl.backends import (
    CGet,
    CMove,
    DicomQR,
    LocalFolder,
    Mint,
    QidoRS,
    Rad69,
    WadoRS,
    WadoURI,
)
from trolley_etl.backends.http import BearerAuth
from trolley_etl.core.model import QueryLevel
from trolley_etl.manifest import load_manifest
from trolley_etl.runner.backends import build_backends, describe_source

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests"


@pytest.fixture(autouse=True)
def secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PACS_USER", "PACS_PASSWORD", "PACS_TOKEN", "VNA_TOKEN"):
        monkeypatch.setenv(name, f"value-of-{name}")


def test_qido_rs_and_wado_rs_share_the_basic_credentials() -> None:
    manifest = load_manifest(EXAMPLES / "dicomweb-ct-by-date.yaml")
    searcher, downloader = build_backends(manifest)
    assert isinstance(searcher, QidoRS) and isinstance(downloader, WadoRS)
    auth = searcher.http.session.auth
    assert isinstance(auth, HTTPBasicAuth)
    assert (auth.username, auth.password) == ("value-of-PACS_USER", "value-of-PACS_PASSWORD")
    assert describe_source(manifest.source.effective_download) == (
        "wado-rs https://pacs.example.org/dicom-web"
    )


def test_implied_wado_rs_gets_the_bearer_token() -> None:
    _, downloader = build_backends(load_manifest(EXAMPLES / "cohort-from-csv.yaml"))
    assert isinstance(downloader, WadoRS)
    assert isinstance(downloader.http.session.auth, BearerAuth)


def test_wado_uri_with_a_private_ca() -> None:
    _, downloader = build_backends(load_manifest(EXAMPLES / "wado-uri-archive.yaml"))
    assert isinstance(downloader, WadoURI)
    assert downloader.http.session.verify == "/etc/ssl/certs/hospital-ca.pem"


def test_dicom_qr_and_series_level_c_move() -> None:
    searcher, downloader = build_backends(load_manifest(EXAMPLES / "dimse-c-move.yaml"))
    assert isinstance(searcher, DicomQR) and isinstance(downloader, CMove)
    assert downloader.retrieval_level is QueryLevel.SERIES
    assert (downloader.settings.host, downloader.settings.called_aet) == (
        "pacs.example.org",
        "PACS",
    )
    assert describe_source(load_manifest(EXAMPLES / "dimse-c-move.yaml").source.download) == (
        "c-move PACS@pacs.example.org:104"
    )


def test_dicom_qr_implies_c_get(tmp_path: Path) -> None:
    text = (EXAMPLES / "dimse-c-move.yaml").read_text()
    text = text[: text.index("  download:")] + text[text.index("queries:") :]
    (tmp_path / "m.yaml").write_text(text)
    _, downloader = build_backends(load_manifest(tmp_path / "m.yaml"))
    assert isinstance(downloader, CGet)


def test_mint_with_rad69() -> None:
    searcher, downloader = build_backends(load_manifest(EXAMPLES / "mint-rad69.yaml"))
    assert isinstance(searcher, Mint) and isinstance(downloader, Rad69)
    assert downloader.repository_id == "1.3.6.1.4.1.21367.13.80.110"
    assert downloader.batch_size == 200


def test_local_folder_is_searcher_and_downloader(tmp_path: Path) -> None:
    (tmp_path / "incoming" / "scanner-export").mkdir(parents=True)
    (tmp_path / "m.yaml").write_text((EXAMPLES / "local-reorganise.yaml").read_text())
    searcher, downloader = build_backends(load_manifest(tmp_path / "m.yaml"))
    assert isinstance(searcher, LocalFolder) and downloader is searcher


@pytest.mark.subprocess
def test_backends_load_lazily_and_completely() -> None:
    import subprocess
    import sys

    code = (
        "import sys, trolley_etl.cli.main\n"
        "assert 'pynetdicom' not in sys.modules, 'pynetdicom loaded eagerly'\n"
        "import trolley_etl.backends as b\n"
        "for name in b.__all__: getattr(b, name)\n"
        "assert 'pynetdicom' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
