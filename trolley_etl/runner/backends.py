"""Build the searcher and downloader a manifest names, with secrets read from the environment."""

from __future__ import annotations

from typing import Any

from requests.auth import AuthBase

from trolley_etl.backends.http import auth_from_env, redact_url
from trolley_etl.core.backend import Downloader, Searcher
from trolley_etl.core.errors import TrolleyError
from trolley_etl.manifest import Manifest
from trolley_etl.manifest.models import (
    BasicAuth,
    BearerAuth,
    HttpBackend,
    NoAuth,
    QidoRsSearch,
    WadoRsDownload,
    WadoUriDownload,
)


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
    raise TrolleyError(f"unsupported auth {auth!r}")


def _http_options(config: HttpBackend) -> dict[str, Any]:
    return {
        "auth": http_auth(config),
        "verify": config.verify_tls,
        "timeout": (min(10.0, config.timeout), config.timeout),
    }


def _dimse_options(config: Any) -> dict[str, Any]:
    return {
        "host": config.host,
        "port": config.port,
        "called_aet": config.called_aet,
        "calling_aet": config.calling_aet,
    }


def build_searcher(manifest: Manifest) -> Searcher:
    config = manifest.source.search
    if isinstance(config, QidoRsSearch):
        from trolley_etl.backends.qido_rs import QidoRS

        return QidoRS(config.url, page_size=config.page_size, **_http_options(config))
    raise TrolleyError(f"the {config.backend} search backend is not available in this version")


def build_downloader(manifest: Manifest) -> Downloader:
    config = manifest.source.effective_download
    if isinstance(config, WadoRsDownload):
        from trolley_etl.backends.wado_rs import WadoRS

        return WadoRS(config.url, **_http_options(config))
    if isinstance(config, WadoUriDownload):
        from trolley_etl.backends.wado_uri import WadoURI

        return WadoURI(config.url, **_http_options(config))
    raise TrolleyError(f"the {config.backend} download backend is not available in this version")


def describe_source(config: Any) -> str:
    """Where data comes from, for logs and reports: a URL without credentials, or an AE."""
    backend = getattr(config, "backend", "")
    if isinstance(config, HttpBackend):
        return f"{backend} {redact_url(config.url)}"
    if hasattr(config, "called_aet"):
        return f"{backend} {config.called_aet}@{config.host}:{config.port}"
    return f"{backend} {getattr(config, 'path', '')}".rstrip()
