"""Build the searcher and downloader a manifest names, with secrets read from the environment."""

from __future__ import annotations

import threading
from typing import Any

from requests.auth import AuthBase

from trolley_etl.backends.http import auth_from_env, redact_url
from trolley_etl.backends.limits import BackendLimits
from trolley_etl.core.backend import Downloader, Searcher
from trolley_etl.core.errors import TrolleyError
from trolley_etl.manifest import Manifest
from trolley_etl.manifest.models import (
    BasicAuth,
    BearerAuth,
    CGetDownload,
    CMoveDownload,
    CommandAuth,
    DicomQrMetadataDownload,
    DicomQrSearch,
    DownloadConfig,
    HttpBackend,
    ImpaxAuth,
    LocalDownload,
    MintSearch,
    NoAuth,
    OAuth2Auth,
    QidoRsSearch,
    Rad69Download,
    SearchConfig,
    VitreaAuth,
    WadoRsDownload,
    WadoUriDownload,
)
from trolley_etl.runner.bounds import harden


def http_auth(config: HttpBackend) -> AuthBase | None:
    auth = config.auth
    if isinstance(auth, NoAuth):
        return None
    if isinstance(auth, BasicAuth):
        return auth_from_env(
            "basic", username_env=auth.username_env, password_env=auth.password_env
        )
    if isinstance(auth, BearerAuth):
        return auth_from_env("bearer", token_env=auth.token_env)
    if isinstance(auth, (OAuth2Auth, CommandAuth)):
        return token_auth(auth)
    if isinstance(auth, (VitreaAuth, ImpaxAuth)):
        return _session_auth(auth, config)
    raise TrolleyError(f"unsupported auth {auth!r}")


def token_auth(auth: OAuth2Auth | CommandAuth) -> AuthBase:
    """Bearer tokens that are renewed: OAuth 2.0 client credentials or a credential helper."""
    from trolley_etl.backends import token_auth as tokens

    if isinstance(auth, OAuth2Auth):
        return tokens.TokenAuth(tokens.OAuth2ClientCredentials(
            auth.token_url, tokens.read_env(auth.client_id_env),
            tokens.read_env(auth.client_secret_env), scope=auth.scope,
        ))  # fmt: skip
    return tokens.TokenAuth(tokens.CommandToken(auth.command))


def _session_auth(auth: VitreaAuth | ImpaxAuth, config: HttpBackend) -> AuthBase:
    """Vendor session login, shared by backends with the same login; done now, so that a
    refused login stops the command before it searches or downloads anything."""
    from trolley_etl.backends.session_auth import session_auth_from_env

    session = session_auth_from_env(
        auth.type, login_url=auth.login_url, username_env=auth.username_env,
        password_env=auth.password_env, realm=getattr(auth, "realm", "DefaultSystemRealm"),
        verify=(config.tls.path("ca_file") if config.tls else None) or config.verify_tls,
        cert=client_certificate(config),  # the login goes through the same TLS as the archive
    )  # fmt: skip
    session.ensure_login()
    return session


def _http_options(config: HttpBackend) -> dict[str, Any]:
    ca_file = config.tls.path("ca_file") if config.tls else None
    return {
        "auth": http_auth(config),
        "verify": ca_file or config.verify_tls,
        "timeout": (min(10.0, config.timeout), config.timeout),
    }


def backend_limits(config: Any) -> BackendLimits:
    """The caps a backend's manifest entry asks for."""
    rate = config.rate_limit
    return BackendLimits(
        max_connections=config.max_connections,
        requests_per_second=rate.requests_per_second if rate else None,
        megabytes_per_second=rate.megabytes_per_second if rate else None,
    )


def client_certificate(config: Any) -> str | tuple[str, str] | None:
    """The HTTP client certificate of `tls` (one PEM file, or certificate and key)."""
    tls = config.tls
    cert, key = (tls.path("cert_file"), tls.path("key_file")) if tls else (None, None)
    if cert and key:
        return (cert, key)
    return cert


def dimse_tls(config: Any) -> Any:
    """DICOM TLS settings of `tls`, or None."""
    from trolley_etl.backends.dimse import DimseTls

    tls = config.tls
    if tls is None:
        return None
    return DimseTls(tls.path("ca_file"), tls.path("cert_file"), tls.path("key_file"))


def _dimse_options(config: Any) -> dict[str, Any]:
    return {
        "limits": backend_limits(config),
        "tls": dimse_tls(config),
        "host": config.host,
        "port": config.port,
        "called_aet": config.called_aet,
        "calling_aet": config.calling_aet,
        "connection_timeout": config.connection_timeout,
        "acse_timeout": config.acse_timeout,
        "dimse_timeout": config.dimse_timeout,
        "network_timeout": config.network_timeout,
    }


def build_backends(
    manifest: Manifest, stop: threading.Event | None = None, log: Any = None
) -> tuple[Searcher, Downloader]:
    """The searcher and the downloader the manifest names (one object for a local folder).

    `stop` cuts their transfers short when the run stops; `log` (a structlog logger) hears
    about each backend's caps, waits and split searches.
    """
    search, download = manifest.source.search, manifest.source.effective_download
    searcher = _searcher(search, manifest)
    if log is not None and hasattr(searcher, "on_split"):
        searcher.on_split = lambda name, **fields: log.info(name, **fields)
    _apply_caps(searcher, search, "search", log)
    if isinstance(download, LocalDownload) and isinstance(searcher, Downloader):
        return searcher, searcher
    downloader = _downloader(download)
    harden(manifest, searcher, downloader, stop)  # issue 13: bounds and the outage gate
    _apply_caps(downloader, download, "download", log)
    return searcher, downloader


def _apply_caps(backend: Any, config: Any, role: str, log: Any) -> None:
    """HTTP backends get their caps and client certificate on their client; DIMSE ones got
    theirs when built."""
    if not hasattr(config, "max_connections"):
        return
    http = getattr(backend, "http", None)
    settings = getattr(backend, "settings", None)
    if http is not None:
        limits = backend_limits(config)
        http.configure(limits=limits, cert=client_certificate(config))
    elif settings is not None and settings.limits is not None:
        limits = settings.limits
    else:
        return
    if log is not None:
        limits.on_event = lambda name, **fields: log.info(name, role=role, **fields)
        log.info("backend.limits", role=role, source=describe_source(config), **limits.describe())


def _searcher(config: SearchConfig, manifest: Manifest) -> Searcher:
    if isinstance(config, QidoRsSearch):
        from trolley_etl.backends.qido_rs import QidoRS

        return QidoRS(config.url, page_size=config.page_size, max_results=config.max_results,
                      **_http_options(config))  # fmt: skip
    if isinstance(config, MintSearch):
        from trolley_etl.backends.mint import Mint

        return Mint(config.url, **_http_options(config))
    if isinstance(config, DicomQrSearch):
        from trolley_etl.backends.dicom_qr import DicomQR

        return DicomQR(**_dimse_options(config), max_results=config.max_results)
    from trolley_etl.backends.local_folder import LocalFolder

    index = manifest.base_dir / config.index_path if config.index_path else None
    return LocalFolder(manifest.base_dir / config.path, index_path=index)


def _downloader(config: DownloadConfig) -> Downloader:
    if isinstance(config, WadoRsDownload):
        from trolley_etl.backends.wado_rs import WadoRS

        return WadoRS(
            config.url,
            metadata_only=config.metadata_only,
            format=config.format,
            **_http_options(config),
        )
    if isinstance(config, WadoUriDownload):
        from trolley_etl.backends.wado_uri import WadoURI

        return WadoURI(config.url, **_http_options(config))
    if isinstance(config, Rad69Download):
        from trolley_etl.backends.rad69 import Rad69

        return Rad69(
            config.url,
            repository_id=config.repository_id,
            batch_size=config.batch_size,
            **_http_options(config),
        )
    if isinstance(config, DicomQrMetadataDownload):
        from trolley_etl.backends.dicom_qr_metadata import DicomQRMetadata

        return DicomQRMetadata(**_dimse_options(config), keywords=config.keywords,
                               format=config.format)  # fmt: skip
    if isinstance(config, CGetDownload):
        from trolley_etl.backends.c_get import CGet

        return CGet(**_dimse_options(config))
    if isinstance(config, CMoveDownload):
        from trolley_etl.backends.c_move import CMove

        return CMove(
            **_dimse_options(config),
            move_destination={"aet": config.move_destination.aet,
                              "port": config.move_destination.port},
            retrieval_level=None if config.level == "study" else config.level,
        )  # fmt: skip
    raise TrolleyError(f"a {config.backend} download needs a {config.backend} search")


def describe_source(config: Any) -> str:
    """Where data comes from, for logs and reports: a URL without credentials, or an AE."""
    backend = getattr(config, "backend", "")
    if isinstance(config, HttpBackend):
        return f"{backend} {redact_url(config.url)}"
    if hasattr(config, "called_aet"):
        return f"{backend} {config.called_aet}@{config.host}:{config.port}"
    return f"{backend} {getattr(config, 'path', '')}".rstrip()
