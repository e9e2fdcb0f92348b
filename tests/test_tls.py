"""TLS a hospital needs: HTTPS with a private CA, mutual TLS, and DICOM TLS.

HTTPS comes from stunnel in front of the test Orthanc (Debian's Orthanc 1.10 crashes on
HTTPS connections); DICOM TLS is Orthanc's own (`DicomTlsEnabled`), with client
certificates required. Certificates come from a private CA made for the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl._harness.certs import LocalPKI, make_pki
from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, GeneratedInstance
from trolley_etl._harness.orthanc import OrthancServer, free_port
from trolley_etl._harness.tls_front import TlsFront
from trolley_etl.cli.main import main

ACCESSION = "ACC1001"
INSTANCES = COHORT_ACCESSIONS[ACCESSION].instance_count


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https(tmp_path_factory, orthanc: OrthancServer, pki: LocalPKI) -> Iterator[TlsFront]:
    with TlsFront(
        tmp_path_factory.mktemp("stunnel"),
        orthanc.http_port,
        cert=pki.server_cert,
        key=pki.server_key,
    ) as front:
        yield front


@pytest.fixture(scope="module")
def mutual(tmp_path_factory, orthanc: OrthancServer, pki: LocalPKI) -> Iterator[TlsFront]:
    with TlsFront(
        tmp_path_factory.mktemp("stunnel-mtls"),
        orthanc.http_port,
        cert=pki.server_cert,
        key=pki.server_key,
        client_ca=pki.ca,
    ) as front:
        yield front


@pytest.fixture(scope="module")
def dicom_tls(
    tmp_path_factory, pki: LocalPKI, cohort: list[GeneratedInstance]
) -> Iterator[OrthancServer]:
    server = OrthancServer(
        tmp_path_factory.mktemp("orthanc-dicom-tls"),
        extra_config={
            "DicomTlsEnabled": True,
            "DicomTlsCertificate": str(pki.server_cert),
            "DicomTlsPrivateKey": str(pki.server_key),
            "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
        },
    ).start()
    try:
        study = COHORT_ACCESSIONS[ACCESSION].study_uid
        server.upload_many(c.data for c in cohort if c.study_uid == study)
        yield server
    finally:
        server.stop()


def manifest(tmp_path: Path, source: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "m.yaml"
    path.write_text(
        f"""\
version: 1
name: tls-test
source:
{source}
queries:
  - name: one
    filters: {{AccessionNumber: {ACCESSION}}}
storage:
  root: ./data
"""
    )
    return path


def run(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["run", str(path), "--log-format", "json"])
    return code, capsys.readouterr().err


def stored(tmp_path: Path) -> int:
    return len(list((tmp_path / "data").rglob("*.dcm")))


def http_source(url: str, tls: str = "") -> str:
    extra = f", tls: {tls}" if tls else ""
    return f"""\
  search: {{backend: qido-rs, url: "{url}/dicom-web"{extra}}}
  download: {{backend: wado-rs, url: "{url}/dicom-web"{extra}}}"""


def test_https_with_a_private_ca(https: TlsFront, pki: LocalPKI, tmp_path: Path, capsys) -> None:
    code, err = run(manifest(tmp_path / "a", http_source(https.url)), capsys)
    assert code == 3 and "certificate verify failed" in err  # the system CAs do not know it
    good = manifest(tmp_path / "b", http_source(https.url, f"{{ca_file: {pki.ca}}}"))
    code, err = run(good, capsys)
    assert code == 0, err
    assert stored(tmp_path / "b") == INSTANCES


def test_mutual_tls(mutual: TlsFront, pki: LocalPKI, tmp_path: Path, capsys) -> None:
    only_ca = f"{{ca_file: {pki.ca}}}"
    code, err = run(manifest(tmp_path / "a", http_source(mutual.url, only_ca)), capsys)
    assert code == 3, err  # the front asks for a client certificate
    with_cert = f"{{ca_file: {pki.ca}, cert_file: {pki.client_cert}, key_file: {pki.client_key}}}"
    code, err = run(manifest(tmp_path / "b", http_source(mutual.url, with_cert)), capsys)
    assert code == 0, err
    assert stored(tmp_path / "b") == INSTANCES


def test_doctor_checks_the_certificate(
    https: TlsFront, pki: LocalPKI, tmp_path: Path, capsys
) -> None:
    good = manifest(tmp_path / "a", http_source(https.url, f"{{ca_file: {pki.ca}}}"))
    assert main(["doctor", str(good)]) == 0
    assert "ok    search    tls          certificate valid until" in capsys.readouterr().out
    wrong = manifest(tmp_path / "b", http_source(https.url, f"{{ca_file: {pki.stranger_ca}}}"))
    assert main(["doctor", str(wrong)]) == 3
    line = next(x for x in capsys.readouterr().out.splitlines() if " tls " in x)
    assert line.startswith("FAIL  search    tls          certificate of 127.0.0.1 not accepted")
    assert "fix: set tls.ca_file to the CA that signed the archive's certificate" in line


def dimse_source(server: OrthancServer, tls: str = "", download: str = "backend: c-get") -> str:
    where = f"host: 127.0.0.1, port: {server.dicom_port}, called_aet: {server.aet}"
    extra = f", tls: {tls}" if tls else ""
    return f"""\
  search: {{backend: dicom-qr, {where}{extra}}}
  download: {{{download}, {where}{extra}}}"""


@pytest.mark.archive
def test_dicom_tls_c_find_and_c_get(
    dicom_tls: OrthancServer, pki: LocalPKI, tmp_path: Path, capsys
) -> None:
    code, err = run(manifest(tmp_path / "a", dimse_source(dicom_tls)), capsys)
    assert code == 3, err  # plain DICOM to a TLS port
    no_cert = f"{{ca_file: {pki.ca}}}"
    code, err = run(manifest(tmp_path / "b", dimse_source(dicom_tls, no_cert)), capsys)
    assert code == 3, err  # the archive requires our certificate
    full = f"{{ca_file: {pki.ca}, cert_file: {pki.client_cert}, key_file: {pki.client_key}}}"
    path = manifest(tmp_path / "c", dimse_source(dicom_tls, full))
    code, err = run(path, capsys)
    assert code == 0, err
    assert stored(tmp_path / "c") == INSTANCES
    assert main(["doctor", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ok    search    tls          certificate valid until" in out
    assert "C-ECHO succeeded" in out


@pytest.mark.archive
def test_dicom_tls_c_move(dicom_tls: OrthancServer, pki: LocalPKI, tmp_path: Path, capsys) -> None:
    """The archive opens its C-STORE association to our destination over TLS as well."""
    port = free_port()
    response = dicom_tls.request(
        "PUT",
        "/modalities/TLSMOVE",
        json={"AET": "TLSMOVE", "Host": "127.0.0.1", "Port": port, "UseDicomTls": True},
    )
    response.raise_for_status()
    full = f"{{ca_file: {pki.ca}, cert_file: {pki.client_cert}, key_file: {pki.client_key}}}"
    move = f"backend: c-move, move_destination: {{aet: TLSMOVE, port: {port}}}"
    code, err = run(manifest(tmp_path, dimse_source(dicom_tls, full, move)), capsys)
    assert code == 0, err
    assert stored(tmp_path) == INSTANCES


def test_tls_files_must_exist(tmp_path: Path) -> None:
    from trolley_etl.core.errors import ManifestError
    from trolley_etl.manifest import load_manifest

    path = manifest(tmp_path, http_source("https://pacs", "{ca_file: missing-ca.pem}"))
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(path)
    path = manifest(tmp_path, http_source("https://pacs", f"{{key_file: {path}}}"))
    with pytest.raises(ManifestError, match="key_file needs cert_file"):
        load_manifest(path)


def test_relative_tls_paths_hold_for_an_implied_download(
    https: TlsFront, pki: LocalPKI, tmp_path: Path, capsys
) -> None:
    """Paths are relative to the manifest, also in the WADO-RS download qido-rs implies."""
    import shutil

    shutil.copy(pki.ca, tmp_path / "hospital-ca.pem")
    source = (
        f'  search: {{backend: qido-rs, url: "{https.url}/dicom-web", '
        "tls: {ca_file: hospital-ca.pem}}"
    )
    path = manifest(tmp_path, source)
    from trolley_etl.manifest import load_manifest

    implied = load_manifest(path).source.effective_download
    assert implied.tls is not None  # type: ignore[union-attr]
    assert implied.tls.path("ca_file") == str(tmp_path / "hospital-ca.pem")  # type: ignore[union-attr]
    code, err = run(path, capsys)
    assert code == 0, err
    assert stored(tmp_path) == INSTANCES
