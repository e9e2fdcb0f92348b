"""Manifest version 1: the pydantic models, strict, with errors users can act on.

Every model rejects unknown keys (with a "did you mean" hint), backends are a discriminated
union on `backend` so each one's own fields are checked, secrets can only be named (never
written) in the file, and query filters and layouts are validated with the same code the
Trolley uses. Paths in the manifest are relative to the manifest's folder, which the loader
passes in the validation context as `base_dir`.
"""

from __future__ import annotations

import datetime
import difflib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from trolley_etl.backends.metadata_types import DEFAULT_METADATA_KEYWORDS
from trolley_etl.core.constants import DEFAULT_LAYOUT
from trolley_etl.core.errors import LayoutError, QueryError
from trolley_etl.core.layout import LayoutTemplate
from trolley_etl.core.query import FilterValue, check_keyword, normalise_filter
from trolley_etl.core.relative_dates import RELATIVE_SPEC, RelativeDate
from trolley_etl.manifest.csv_list import CsvProblem, read_column

if TYPE_CHECKING:
    from requests.auth import AuthBase

    from trolley_etl.backends.dimse import DimseSettings
    from trolley_etl.backends.http import HttpSettings
    from trolley_etl.backends.limits import BackendLimits
    from trolley_etl.core.backend import Downloader, Searcher

MANIFEST_VERSION = 1
#: Keys that would hold a secret in the file itself; each has an `_env` twin.
LITERAL_SECRETS = {"password": "password_env", "token": "token_env", "username": "username_env"}

EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=200)]
AETitle = Annotated[
    str,
    Field(
        min_length=1,
        max_length=16,
        pattern=r"^[\x21-\x5b\x5d-\x7e]([\x20-\x5b\x5d-\x7e]*[\x21-\x5b\x5d-\x7e])?$",
    ),
]
Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0, le=86400)]
#: A filter value as YAML gives it: text, a number, a date (YAML reads 2024-01-31 as one),
#: or a list of those.
FilterInput = str | int | float | datetime.date | list[str | int | float | datetime.date]


def _relative_date(value: Any) -> Any:
    """A mapping as a filter value can only be `{last: 7d}`: one clear message, not one per
    type of the union."""
    if not isinstance(value, dict):
        return value
    if set(value) != {"last"} or not RELATIVE_SPEC.match(str(value["last"])):
        raise error(
            "relative_date",
            "a relative date is {last: N<unit>} with unit d, w, m or y, e.g. {last: 7d}",
        )
    return RelativeDate(last=str(value["last"]))


#: A query set filter may also be relative to the day of the search: `{last: 7d}`.
QueryFilterInput = Annotated[FilterInput | RelativeDate, BeforeValidator(_relative_date)]


def did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def error(kind: str, message: str, *at: str | int) -> PydanticCustomError:
    """A validation error whose position is `at` below the model being validated."""
    return PydanticCustomError(kind, "{message}", {"message": message, "at": list(at)})


class StrictModel(BaseModel):
    """Rejects unknown keys, naming the closest known one, and literal secrets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = list(cls.model_fields)
        for key in data:
            if key in known:
                continue
            key = str(key)
            if key in LITERAL_SECRETS:
                twin = LITERAL_SECRETS[key]
                raise error(
                    "literal_secret",
                    f"secrets are never written in a manifest: put the value in an environment "
                    f"variable and give its name instead, e.g. `{twin}: PACS_{key.upper()}`",
                    key,
                )
            raise error("unknown_key", f"unknown key {key!r}{did_you_mean(key, known)}", key)
        return data


# --- auth --------------------------------------------------------------------------------------


class NoAuth(StrictModel):
    type: Literal["none"] = "none"

    def build(self, backend: HttpBackend) -> AuthBase | None:
        """No credentials."""
        return None


class BasicAuth(StrictModel):
    """HTTP basic auth; both values are read from the environment at run time."""

    type: Literal["basic"]
    username_env: EnvName
    password_env: EnvName

    def build(self, backend: HttpBackend) -> AuthBase | None:
        """Basic auth with the values of the two variables, read now."""
        from trolley_etl.backends.http import auth_from_env

        return auth_from_env(
            "basic", username_env=self.username_env, password_env=self.password_env
        )


class BearerAuth(StrictModel):
    """`Authorization: Bearer` with a token read from the environment."""

    type: Literal["bearer"]
    token_env: EnvName

    def build(self, backend: HttpBackend) -> AuthBase | None:
        """A fixed bearer token, read now."""
        from trolley_etl.backends.http import auth_from_env

        return auth_from_env("bearer", token_env=self.token_env)


def _check_login_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise error("url", f"not an http(s) URL: {url!r}")
    if parts.username or parts.password:
        raise PydanticCustomError(
            "url_credentials", "credentials in the URL are not allowed: use username_env"
        )
    return url


class VitreaAuth(StrictModel):
    """Vitrea Connection session login (X-Userid/X-Password/X-Realm), renewed when it ends."""

    type: Literal["vitrea"]
    login_url: str = Field(description="the login address, e.g. https://vitrea/login")
    username_env: EnvName
    password_env: EnvName
    realm: str = Field(default="DefaultSystemRealm", min_length=1, max_length=200)

    _url = field_validator("login_url")(_check_login_url)

    def build(self, backend: HttpBackend) -> AuthBase | None:
        """The shared Vitrea session, logged in now (see `_session_login`)."""
        return _session_login(self.type, self.login_url, self, backend, self.realm)


class ImpaxAuth(StrictModel):
    """AGFA IMPAX Data Center form login (j_security_check), renewed when the session ends."""

    type: Literal["impax"]
    login_url: str = Field(
        description="the web application the session is opened at (the WADO endpoint); the "
        "form is posted to its j_security_check"
    )
    username_env: EnvName
    password_env: EnvName

    _url = field_validator("login_url")(_check_login_url)

    def build(self, backend: HttpBackend) -> AuthBase | None:
        """The shared IMPAX session, logged in now (see `_session_login`)."""
        return _session_login(self.type, self.login_url, self, backend)


def _session_login(
    kind: str,
    login_url: str,
    auth: VitreaAuth | ImpaxAuth,
    backend: HttpBackend,
    realm: str = "DefaultSystemRealm",
) -> AuthBase:
    """Vendor session login, shared by backends with the same login; done at once, so that a
    refused login stops the command before it searches or downloads anything. The login goes
    through the same TLS as the archive."""
    from trolley_etl.backends.session_auth import session_auth_from_env

    session = session_auth_from_env(
        kind,
        login_url=login_url,
        username_env=auth.username_env,
        password_env=auth.password_env,
        realm=realm,
        verify=backend.tls_verify(),
        cert=backend.client_certificate(),
    )
    session.ensure_login()
    return session


class OAuth2Auth(StrictModel):
    """OAuth 2.0 client credentials: a bearer token from `token_url`, renewed before it
    expires (and once more if the archive answers 401)."""

    type: Literal["oauth2"]
    token_url: str = Field(description="the token endpoint, e.g. https://idp.example.org/token")
    client_id_env: EnvName
    client_secret_env: EnvName
    scope: str | None = Field(default=None, max_length=2000)

    @field_validator("token_url")
    @classmethod
    def _check_token_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise error("url", f"not an http(s) URL: {url!r}")
        if parts.username or parts.password:
            raise error("url_credentials", "credentials in the URL are not allowed")
        if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise error("url_plain_http", "the client secret would travel unencrypted: use https")
        return url

    def build(self, backend: HttpBackend) -> AuthBase | None:
        """Tokens from the token endpoint, renewed before they expire."""
        from trolley_etl.backends import token_auth as tokens

        source = tokens.OAuth2ClientCredentials(
            self.token_url,
            tokens.read_env(self.client_id_env),
            tokens.read_env(self.client_secret_env),
            scope=self.scope,
        )
        return tokens.TokenAuth(source)


class CommandAuth(StrictModel):
    """A credential helper whose output is the bearer token (`[gcloud, auth,
    print-access-token]`); run again when the token expires or the archive answers 401."""

    type: Literal["command"]
    command: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        min_length=1, max_length=100, description="program and arguments (no shell)"
    )

    def build(self, backend: HttpBackend) -> AuthBase | None:
        """Tokens from the credential helper, asked again when one expires."""
        from trolley_etl.backends import token_auth as tokens

        return tokens.TokenAuth(tokens.CommandToken(self.command))


Auth = Annotated[
    NoAuth | BasicAuth | BearerAuth | VitreaAuth | ImpaxAuth | OAuth2Auth | CommandAuth,
    Field(discriminator="type"),
]


# --- backends ----------------------------------------------------------------------------------


class RateLimit(StrictModel):
    """Caps on the pace of one backend, shared by all workers."""

    requests_per_second: float | None = Field(
        default=None, gt=0, le=10_000, description="HTTP requests or DICOM associations started"
    )
    megabytes_per_second: float | None = Field(
        default=None, gt=0, le=100_000, description="data received, in 10^6 bytes per second"
    )

    @model_validator(mode="after")
    def _check_some(self) -> RateLimit:
        if self.requests_per_second is None and self.megabytes_per_second is None:
            raise error(
                "empty_rate_limit", "give requests_per_second, megabytes_per_second or both"
            )
        return self


class TlsFiles(StrictModel):
    """TLS with a private CA and client certificates (PEM files, relative to the manifest)."""

    ca_file: str | None = Field(
        default=None, description="the CA certificate(s) that signed the archive's certificate"
    )
    cert_file: str | None = Field(
        default=None, description="our client certificate (mutual TLS); may also hold the key"
    )
    key_file: str | None = Field(default=None, description="the private key of cert_file")

    _resolved: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check_files(self, info: ValidationInfo) -> TlsFiles:
        if self.key_file and not self.cert_file:
            raise error("tls", "key_file needs cert_file", "cert_file")
        base = Path((info.context or {}).get("base_dir", "."))
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if value is None:
                continue
            path = (base / value).absolute()
            if not path.is_file():
                raise error("tls_file", f"file not found: {path}", name)
            self._resolved[name] = str(path)
        return self

    def path(self, name: str) -> str | None:
        """`ca_file`, `cert_file` or `key_file`, resolved against the manifest's folder."""
        return self._resolved.get(name)


class BackendCaps(StrictModel):
    """What a backend may ask of the archive at once (see the README for PACS administrators)."""

    max_connections: int = Field(
        default=4,
        ge=1,
        le=64,
        description="concurrent HTTP connections or DICOM associations, across all workers",
    )
    rate_limit: RateLimit | None = None

    def backend_limits(self) -> BackendLimits:
        """The caps this entry asks for, as the object its backend enforces them with."""
        from trolley_etl.backends.limits import BackendLimits

        rate = self.rate_limit
        return BackendLimits(
            max_connections=self.max_connections,
            requests_per_second=rate.requests_per_second if rate else None,
            megabytes_per_second=rate.megabytes_per_second if rate else None,
        )


class HttpBackend(BackendCaps):
    url: str = Field(description="Base URL, e.g. https://pacs.example.org/dicom-web")
    auth: Auth = Field(default_factory=NoAuth)
    verify_tls: bool | str = Field(
        default=True, description="false to skip TLS verification, or a CA bundle path"
    )
    timeout: Seconds = Field(default=300, description="seconds to wait for the server")
    tls: TlsFiles | None = Field(default=None, description="private CA and client certificate")

    @model_validator(mode="after")
    def _check_tls(self) -> HttpBackend:
        if self.tls is not None and self.tls.ca_file and self.verify_tls is not True:
            raise error("tls", "give either tls.ca_file or verify_tls, not both", "verify_tls")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise error("url", f"not an http(s) URL: {url!r}")
        if parts.username or parts.password:
            raise PydanticCustomError(
                "url_credentials",
                "credentials in the URL are not allowed: use auth with username_env/password_env",
            )
        return url.rstrip("/")

    def tls_verify(self) -> bool | str:
        """What the archive's certificate is checked against: a CA file, or verify_tls."""
        ca_file = self.tls.path("ca_file") if self.tls else None
        return ca_file or self.verify_tls

    def client_certificate(self) -> str | tuple[str, str] | None:
        """The client certificate of `tls` (one PEM file, or certificate and key)."""
        if self.tls is None:
            return None
        cert, key = self.tls.path("cert_file"), self.tls.path("key_file")
        return (cert, key) if cert and key else cert

    def http_settings(self, limits: BackendLimits | None = None) -> HttpSettings:
        """This entry's connection; credentials are read from the environment now."""
        from trolley_etl.backends.http import HttpSettings

        return HttpSettings(
            self.url,
            auth=self.auth.build(self),
            verify=self.tls_verify(),
            timeout=(min(10.0, self.timeout), self.timeout),
            cert=self.client_certificate(),
            limits=limits,
        )

    def describe(self) -> str:
        """The protocol and URL without credentials, for logs and reports."""
        from trolley_etl.backends.http import redact_url

        return f"{getattr(self, 'backend', 'http')} {redact_url(self.url)}"


class DimseBackend(BackendCaps):
    host: str = Field(min_length=1)
    port: Port
    called_aet: AETitle
    calling_aet: AETitle = "TROLLEY"
    connection_timeout: Seconds = 10
    acse_timeout: Seconds = 30
    dimse_timeout: Seconds = 120
    network_timeout: Seconds = 120
    tls: TlsFiles | None = Field(default=None, description="DICOM TLS (the archive's TLS port)")

    def dimse_settings(self, limits: BackendLimits | None = None) -> DimseSettings:
        """This entry's association settings (pynetdicom is imported only now)."""
        from trolley_etl.backends.dimse import DimseSettings, DimseTls

        tls = self.tls
        return DimseSettings(
            self.host,
            self.port,
            self.called_aet,
            self.calling_aet,
            connection_timeout=self.connection_timeout,
            acse_timeout=self.acse_timeout,
            dimse_timeout=self.dimse_timeout,
            network_timeout=self.network_timeout,
            limits=limits,
            tls=None
            if tls is None
            else DimseTls(tls.path("ca_file"), tls.path("cert_file"), tls.path("key_file")),
        )

    def describe(self) -> str:
        """The protocol and the archive's AE title and address."""
        backend = getattr(self, "backend", "dicom")
        return f"{backend} {self.called_aet}@{self.host}:{self.port}"


#: The archive's cap on the results of one search; searches at the cap are split by date.
MaxResults = Annotated[
    int | None,
    Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="the archive's cap on one search's results; a search that reaches it is "
        "split by StudyDate (then StudyTime) until every part is under it",
    ),
]


class QidoRsSearch(HttpBackend):
    backend: Literal["qido-rs"]
    page_size: int = Field(default=1000, ge=1, le=100_000)
    max_results: MaxResults = None

    def searcher(self, base_dir: Path, limits: BackendLimits | None = None) -> Searcher:
        """A QIDO-RS searcher."""
        from trolley_etl.backends.qido_rs import QidoRS

        settings = self.http_settings(limits)
        return QidoRS(settings, page_size=self.page_size, max_results=self.max_results)


class MintSearch(HttpBackend):
    backend: Literal["mint"]

    def searcher(self, base_dir: Path, limits: BackendLimits | None = None) -> Searcher:
        """A MINT searcher."""
        from trolley_etl.backends.mint import Mint

        return Mint(self.http_settings(limits))


class DicomQrSearch(DimseBackend):
    backend: Literal["dicom-qr"]
    max_results: MaxResults = None

    def searcher(self, base_dir: Path, limits: BackendLimits | None = None) -> Searcher:
        """A C-FIND searcher."""
        from trolley_etl.backends.dicom_qr import DicomQR

        return DicomQR(self.dimse_settings(limits), max_results=self.max_results)


class LocalSearch(StrictModel):
    backend: Literal["local"]
    path: str = Field(min_length=1, description="folder of DICOM files, relative to the manifest")
    index_path: str | None = Field(
        default=None, description="where to keep the index (default: inside the folder)"
    )

    def searcher(self, base_dir: Path, limits: BackendLimits | None = None) -> Searcher:
        """The folder's index; also the downloader of a `local` download."""
        from trolley_etl.backends.local_folder import LocalFolder

        index = base_dir / self.index_path if self.index_path else None
        return LocalFolder(base_dir / self.path, index_path=index)

    def describe(self) -> str:
        """The folder as the manifest names it."""
        return f"{self.backend} {self.path}"


SearchConfig = QidoRsSearch | DicomQrSearch | MintSearch | LocalSearch
SearchBackend = Annotated[SearchConfig, Field(discriminator="backend")]


class WadoRsDownload(HttpBackend):
    backend: Literal["wado-rs"]
    metadata_only: bool = Field(
        default=False,
        description="only each instance's header, from WADO-RS /metadata, without pixel data",
    )
    format: Literal["dicom", "json"] = Field(
        default="dicom",
        description="metadata_only files: Part 10 without pixel data (dicom) or DICOM JSON (json)",
    )

    @model_validator(mode="after")
    def _check_format(self) -> WadoRsDownload:
        if self.format != "dicom" and not self.metadata_only:
            raise error(
                "format_needs_metadata_only",
                "format: json applies to metadata_only: true (full pulls store Part 10 as sent)",
                "format",
            )
        return self

    def downloader(self, limits: BackendLimits | None = None) -> Downloader:
        """A WADO-RS downloader (of headers only with `metadata_only`)."""
        from trolley_etl.backends.wado_rs import WadoRS

        return WadoRS(
            self.http_settings(limits), metadata_only=self.metadata_only, format=self.format
        )

    @model_serializer(mode="wrap")
    def _omit_metadata_defaults(self, handler: Any) -> Any:
        """Full pulls dump as before these fields existed, so their checkpoints still match."""
        data = handler(self)
        if not self.metadata_only and isinstance(data, dict):
            data.pop("metadata_only", None)
            data.pop("format", None)
        return data


class WadoUriDownload(HttpBackend):
    backend: Literal["wado-uri"]

    def downloader(self, limits: BackendLimits | None = None) -> Downloader:
        """A WADO-URI downloader (instance by instance)."""
        from trolley_etl.backends.wado_uri import WadoURI

        return WadoURI(self.http_settings(limits))


class Rad69Download(HttpBackend):
    backend: Literal["rad69"]
    repository_id: str = Field(
        min_length=1, description="the Imaging Document Source's RepositoryUniqueId (an OID)"
    )
    batch_size: int = Field(default=500, ge=1, le=10_000, description="instances per request")

    def downloader(self, limits: BackendLimits | None = None) -> Downloader:
        """A RAD-69 downloader."""
        from trolley_etl.backends.rad69 import Rad69

        return Rad69(
            self.http_settings(limits),
            repository_id=self.repository_id,
            batch_size=self.batch_size,
        )


class CGetDownload(DimseBackend):
    backend: Literal["c-get"]
    level: Literal["study", "series"] = Field(
        default="study",
        description="series: one C-GET per series (for archives that refuse study-level "
        "C-GET; the series of a study then run in parallel across workers)",
    )

    def downloader(self, limits: BackendLimits | None = None) -> Downloader:
        """A C-GET downloader."""
        from trolley_etl.backends.c_get import CGet

        return CGet(
            self.dimse_settings(limits),
            retrieval_level=None if self.level == "study" else self.level,
        )


class MoveDestination(StrictModel):
    """The Storage SCP that trolley-etl runs; the archive must know it under this AE title."""

    aet: AETitle
    port: Port


class CMoveDownload(DimseBackend):
    backend: Literal["c-move"]
    move_destination: MoveDestination
    level: Literal["study", "series"] = Field(
        default="study", description="series: move series by series (some archives need it)"
    )

    def downloader(self, limits: BackendLimits | None = None) -> Downloader:
        """A C-MOVE downloader with its own Storage SCP on `move_destination`."""
        from trolley_etl.backends import c_move

        destination = c_move.MoveDestination(self.move_destination.aet, self.move_destination.port)
        return c_move.CMove(
            self.dimse_settings(limits),
            move_destination=destination,
            retrieval_level=None if self.level == "study" else self.level,
        )


class DicomQrMetadataDownload(DimseBackend):
    """Headers only, from an instance-level C-FIND: metadata-only pulls from DICOM archives."""

    backend: Literal["dicom-qr"]
    metadata_only: Literal[True] = Field(description="must be true: a C-FIND gives headers only")
    keywords: list[str] = Field(
        default_factory=lambda: list(DEFAULT_METADATA_KEYWORDS),
        min_length=1,
        description="DICOM keywords to ask for at instance level (the UIDs always come)",
    )
    format: Literal["dicom", "json"] = Field(
        default="dicom", description="Part 10 without pixel data (dicom) or DICOM JSON (json)"
    )

    @field_validator("keywords")
    @classmethod
    def _check_keywords(cls, keywords: list[str]) -> list[str]:
        for index, keyword in enumerate(keywords):
            try:
                check_keyword(keyword)
            except QueryError as exc:
                raise error("keyword", str(exc), index) from None
        return keywords

    def downloader(self, limits: BackendLimits | None = None) -> Downloader:
        """Headers from an instance-level C-FIND."""
        from trolley_etl.backends.dicom_qr_metadata import DicomQRMetadata

        return DicomQRMetadata(
            self.dimse_settings(limits), keywords=self.keywords, format=self.format
        )


class LocalDownload(StrictModel):
    """Copies from the folder the local search indexed."""

    backend: Literal["local"]

    def downloader(self, limits: BackendLimits | None = None) -> Downloader:
        """Never built on its own: the local search is its own downloader."""
        from trolley_etl.core.errors import ConfigurationError

        raise ConfigurationError("a local download needs a local search")

    def describe(self) -> str:
        """The folder of the local search."""
        return self.backend


DownloadConfig = (
    WadoRsDownload
    | WadoUriDownload
    | CGetDownload
    | CMoveDownload
    | Rad69Download
    | LocalDownload
    | DicomQrMetadataDownload
)
DownloadBackend = Annotated[DownloadConfig, Field(discriminator="backend")]


class Source(StrictModel):
    search: SearchBackend
    download: DownloadBackend | None = Field(
        default=None, description="may be omitted where the search backend implies one"
    )

    _base_dir: str = PrivateAttr(default=".")

    @model_validator(mode="after")
    def _remember_base_dir(self, info: ValidationInfo) -> Source:
        """For the implied download: its tls paths are relative to the manifest too."""
        self._base_dir = str((info.context or {}).get("base_dir", "."))
        return self

    @model_validator(mode="after")
    def _check_pair(self) -> Source:
        search, download = self.search.backend, self.download.backend if self.download else None
        if download is None and search == "mint":
            raise error(
                "missing_download",
                "a mint search implies no downloader: add download (wado-rs or rad69)",
                "search",
                "backend",
            )
        if (search == "local") != (download in ("local", None)) and download is not None:
            raise error(
                "incompatible_backends",
                f"a {search} search cannot be paired with a {download} download: the local "
                "backend searches and copies the same folder",
                "download",
                "backend",
            )
        return self

    @property
    def file_format(self) -> Literal["dicom", "json"]:
        """What the stored files are: Part 10, or DICOM JSON (metadata-only with format json)."""
        download = self.effective_download
        if isinstance(download, WadoRsDownload) and download.metadata_only:
            return download.format
        if isinstance(download, DicomQrMetadataDownload):
            return download.format
        return "dicom"

    @property
    def effective_download(self) -> DownloadConfig:
        """The download backend, or the one the search backend implies."""
        if self.download is not None:
            return self.download
        search = self.search
        context = {"base_dir": self._base_dir}  # tls paths are relative to the manifest
        if isinstance(search, QidoRsSearch):
            shared = search.model_dump(exclude={"backend", "page_size", "max_results"})
            return WadoRsDownload.model_validate({"backend": "wado-rs", **shared}, context=context)
        if isinstance(search, DicomQrSearch):
            shared = search.model_dump(exclude={"backend", "max_results"})
            return CGetDownload.model_validate({"backend": "c-get", **shared}, context=context)
        return LocalDownload(backend="local")


# --- what to pull ------------------------------------------------------------------------------


def _validate_filters(filters: dict[str, Any]) -> dict[str, str | list[str]]:
    checked: dict[str, str | list[str]] = {}
    for keyword, value in filters.items():
        if isinstance(value, RelativeDate):  # resolved at search time (core.relative_dates)
            checked[str(keyword)] = _check_relative(str(keyword), value)  # type: ignore[assignment]
            continue
        try:
            normalised: FilterValue = normalise_filter(str(keyword), value)
        except QueryError as exc:
            raise error("filter", str(exc).removeprefix(f"{keyword}: "), keyword) from None
        # a list, as the field is declared (a tuple made pydantic warn on every dump)
        checked[str(keyword)] = list(normalised) if isinstance(normalised, tuple) else normalised
    return checked


def _check_relative(keyword: str, value: RelativeDate) -> RelativeDate:
    try:
        vr = check_keyword(keyword)
    except QueryError as exc:
        raise error("filter", str(exc).removeprefix(f"{keyword}: "), keyword) from None
    if vr != "DA":
        raise error("filter", f"{{last: ...}} is for date keywords (VR DA), not {vr}", keyword)
    return value


class CsvColumn(StrictModel):
    """One query per row: the column's values, matched on the DICOM keyword of its name."""

    path: str = Field(min_length=1, description="CSV file, relative to the manifest")
    column: str = Field(description="column header; also the DICOM keyword to match")
    delimiter: str = Field(default=",", min_length=1, max_length=1)


class QuerySet(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    filters: dict[str, QueryFilterInput] = Field(default_factory=dict)
    from_csv: CsvColumn | None = None
    study_uids: list[str] | None = Field(default=None, min_length=1)
    limit: int | None = Field(default=None, ge=1)
    allow_unmatched: bool = Field(
        default=False,
        description="a CSV row or listed UID that matches no study is reported but does not "
        "make the run fail",
    )

    _csv_values: list[str] = PrivateAttr(default_factory=list)
    _csv_rows: list[int] = PrivateAttr(default_factory=list)

    @field_validator("filters")
    @classmethod
    def _check_filters(cls, filters: dict[str, Any]) -> dict[str, Any]:
        return _validate_filters(filters)

    @field_validator("study_uids")
    @classmethod
    def _check_uids(cls, uids: list[str] | None) -> list[str] | None:
        for index, uid in enumerate(uids or []):
            try:
                normalise_filter("StudyInstanceUID", uid)
            except QueryError as exc:
                raise error("uid", str(exc).removeprefix("StudyInstanceUID: "), index) from None
        return uids

    @model_validator(mode="after")
    def _check_selection(self, info: ValidationInfo) -> QuerySet:
        if not self.filters and self.from_csv is None and not self.study_uids:
            raise error(
                "empty_query",
                "a query set needs filters, from_csv or study_uids; an empty query would pull "
                "the whole archive",
            )
        if self.from_csv is not None:
            self._csv_values = self._read_csv(self.from_csv, info)
        return self

    def _read_csv(self, source: CsvColumn, info: ValidationInfo) -> list[str]:
        if source.column in self.filters:
            raise error(
                "csv_column_in_filters",
                f"{source.column} comes from the CSV; remove it from filters",
                "from_csv",
                "column",
            )
        try:
            normalise_filter(source.column, "")
        except QueryError as exc:
            raise error("csv_column", f"column name: {exc}", "from_csv", "column") from None
        base = Path((info.context or {}).get("base_dir", "."))
        path = base / source.path
        values, problems = read_column(path, source.column, source.delimiter)
        for row, value in values:
            try:
                normalise_filter(source.column, value)
            except QueryError as exc:
                problems.append(CsvProblem(row, str(exc)))
        if problems:
            shown = "; ".join(
                f"{source.path}:{p.row}: {p.message}" if p.row else p.message for p in problems[:5]
            )
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise error("csv", shown + more, "from_csv", "path")
        self._csv_rows = [row for row, _ in values]
        return [value for _, value in values]

    @property
    def csv_values(self) -> list[str]:
        """The values read from `from_csv` when the manifest was validated."""
        return list(self._csv_values)

    @property
    def csv_rows(self) -> list[tuple[int, str]]:
        """`csv_values` with the row number of each in the file (the header is row 1)."""
        return list(zip(self._csv_rows, self._csv_values, strict=True))


class Select(StrictModel):
    """Keep only the series of the matched studies that match these filters."""

    series: dict[str, FilterInput] = Field(default_factory=dict)

    @field_validator("series")
    @classmethod
    def _check_filters(cls, filters: dict[str, Any]) -> dict[str, Any]:
        return _validate_filters(filters)


class S3Settings(StrictModel):
    """Where and as whom to reach an S3 (or S3-compatible) service for an `s3://` root (issue 19).

    Without the `*_env` names, credentials come from the standard provider chain (AWS_*
    variables, shared config, instance role); never from the manifest itself.
    """

    endpoint_url: str | None = Field(
        default=None, description="S3-compatible service URL (default: AWS S3 of the region)"
    )
    region: str | None = Field(default=None, description="e.g. eu-west-1")
    access_key_env: EnvName | None = Field(
        default=None, description="environment variable holding the access key id"
    )
    secret_key_env: EnvName | None = Field(
        default=None, description="environment variable holding the secret access key"
    )
    multipart_threshold_mb: int = Field(
        default=64, ge=5, le=5120, description="objects above this size are sent in parts"
    )

    @model_validator(mode="after")
    def _check_pair(self) -> S3Settings:
        if (self.access_key_env is None) != (self.secret_key_env is None):
            raise error("s3", "access_key_env and secret_key_env go together", "access_key_env")
        if self.endpoint_url is not None and urlsplit(self.endpoint_url).scheme not in (
            "http",
            "https",
        ):
            raise error("url", "endpoint_url must be an http(s) URL", "endpoint_url")
        return self


class Storage(StrictModel):
    root: str = Field(
        min_length=1,
        description="output folder, relative to the manifest, or s3://bucket/prefix",
    )
    s3: S3Settings | None = Field(default=None, description="the S3 service of an s3:// root")
    layout: str = Field(default=DEFAULT_LAYOUT, description="path template of DICOM keywords")
    permissions: Literal["private", "group"] = Field(
        default="private",
        description="private: everything owner-only (0700/0600) whatever the umask; group: "
        "DICOM files and folders group-readable (0640/0750), .trolley stays owner-only",
    )

    @field_validator("layout")
    @classmethod
    def _check_layout(cls, layout: str) -> str:
        try:
            LayoutTemplate(layout)
        except LayoutError as exc:
            raise error("layout", str(exc)) from None
        return layout

    @field_validator("root")
    @classmethod
    def _check_object_root(cls, root: str) -> str:
        if root.startswith("s3://") and not re.fullmatch(
            r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^/].*)?", root.rstrip("/")
        ):
            raise error("root", "an object-storage root is s3://bucket or s3://bucket/prefix")
        if "://" in root and not root.startswith("s3://"):
            raise error("root", "a root is a local folder or s3://bucket/prefix")
        return root


class Limits(StrictModel):
    """Bounds on what an archive may make us hold, wait for or write (issue 13)."""

    max_object_mb: int = Field(
        default=4096, ge=1, le=1_048_576, description="largest DICOM object accepted, in MiB"
    )
    max_search_answer_mb: int = Field(
        default=64, ge=1, le=65_536, description="largest search answer (one page), in MiB"
    )
    max_search_pages: int = Field(
        default=10_000, ge=1, le=1_000_000, description="pages one search may take, at most"
    )
    request_deadline: Seconds = Field(
        default=7200,
        description="seconds one request or association may take in total, however steadily "
        "the server trickles (the backend's timeout is the wait between two reads)",
    )


DayName = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
EVERY_DAY: list[DayName] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class RunWindow(StrictModel):
    """When a run may contact the archive; outside it the run finishes what is in flight and
    waits. A span belongs to the day it starts on (fri 19:00-07:00 ends Saturday morning)."""

    hours: str = Field(
        pattern=r"^\d\d:\d\d(:\d\d)?-\d\d:\d\d(:\d\d)?$",
        description='daily span, "HH:MM-HH:MM"; may cross midnight ("19:00-07:00")',
    )
    days: list[DayName] = Field(
        default_factory=lambda: list(EVERY_DAY),
        min_length=1,
        description="days on which the span starts",
    )
    timezone: str | None = Field(
        default=None, description="IANA time zone, e.g. Europe/Amsterdam (default: this machine's)"
    )

    @model_validator(mode="after")
    def _check_window(self) -> RunWindow:
        from trolley_etl.runner.window import TimeWindow

        try:
            TimeWindow.parse(self.hours, list(self.days), self.timezone)
        except ValueError as exc:
            raise error("window", str(exc)) from None
        return self


class RunSettings(StrictModel):
    workers: int = Field(default=4, ge=1, le=64, description="parallel downloads")
    retries: int = Field(default=3, ge=0, le=20, description="retries per item after a failure")
    cache_searches: bool = Field(
        default=True, description="remember search answers in the checkpoint during a run"
    )
    completeness: Literal["strict", "off"] = Field(
        default="strict",
        description="strict: a unit is done only when it holds as many instances as the "
        "archive said; off: units without a known count are taken as they come",
    )

    outage_wait: float = Field(
        default=300,
        ge=0,
        le=86400,
        description="seconds to wait, probing with backoff, while the whole archive is down "
        "(connection refused or 5xx on every request) before items are failed",
    )
    limits: Limits = Field(default_factory=Limits)
    window: RunWindow | None = Field(
        default=None, description="when the archive may be contacted (e.g. nights only)"
    )
    executor: Literal["threads", "dask"] = Field(
        default="threads",
        description="threads: this process; dask: Dask distributed (the dask extra)",
    )
    scheduler: str | None = Field(
        default=None,
        pattern=r"^(tcp|tls)://[^\s/]+:\d+$",
        description="Dask scheduler address; without it a local cluster of processes",
    )
    state_dir: str | None = Field(
        default=None,
        description="local folder of the checkpoint when storage.root is not a local folder "
        "(default: NAME.state beside the manifest)",
    )

    @field_validator("completeness", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare `off` as false."""
        if isinstance(value, bool):
            return "strict" if value else "off"
        return value


# --- de-identification (issue 14) -----------------------------------------------------------

DeidOption = Literal[
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]


class BlankRegions(StrictModel):
    """Rectangles to blank in the pixels of one device's at-risk instances."""

    manufacturer: str = Field(min_length=1, description="matches Manufacturer (any case)")
    model: str | None = Field(default=None, description="matches ManufacturerModelName")
    regions: list[tuple[int, int, int, int]] = Field(
        min_length=1, max_length=100, description="[x, y, width, height] in pixels"
    )


class Deid(StrictModel):
    """De-identify every instance before it is written (PS3.15 Annex E)."""

    profile: Literal["basic"] = Field(
        default="basic", description="PS3.15 Basic Application Level Confidentiality Profile"
    )
    options: list[DeidOption] = Field(default_factory=list, description="PS3.15 options")
    secret_env: EnvName = Field(description="environment variable holding the HMAC key")
    keep_private: list[str] = Field(
        default_factory=list, description='extra private tags to keep: (0019,"CREATOR",0C)'
    )
    keep: list[str] = Field(default_factory=list, description="keywords the profile would change")
    remove: list[str] = Field(default_factory=list, description="keywords to remove as well")
    allow_burned_in: bool = False
    blank_regions: list[BlankRegions] = Field(default_factory=list, max_length=100)
    date_shift_days: tuple[int, int] = Field(
        default=(-730, -1), description="range of the per-patient date offset, in days"
    )
    pseudonym_map: str | None = Field(
        default=None, description="CSV of original -> pseudonym, outside storage.root"
    )

    @field_validator("keep", "remove")
    @classmethod
    def _check_keywords(cls, keywords: list[str]) -> list[str]:
        from pydicom.datadict import tag_for_keyword

        for index, keyword in enumerate(keywords):
            if tag_for_keyword(keyword) is None:
                raise error("keyword", f"unknown DICOM keyword {keyword!r}", index)
        return keywords

    @field_validator("keep_private")
    @classmethod
    def _check_private(cls, tags: list[str]) -> list[str]:
        from trolley_etl.deid.profile import parse_private_tag

        for index, text in enumerate(tags):
            try:
                parse_private_tag(text)
            except ValueError as exc:
                raise error("private_tag", str(exc), index) from None
        return tags

    @field_validator("date_shift_days")
    @classmethod
    def _check_shift(cls, span: tuple[int, int]) -> tuple[int, int]:
        low, high = span
        if not -36500 <= low <= high <= 36500:
            raise error("date_shift", "need [low, high] with -36500 <= low <= high <= 36500")
        return span

    @model_validator(mode="after")
    def _check_combination(self) -> Deid:
        if {"retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"} <= set(
            self.options
        ):
            raise error("options", "choose one of the two retain_longitudinal options", "options")
        both = sorted(set(self.keep) & set(self.remove))
        if both:
            raise error("keep_remove", f"in both keep and remove: {', '.join(both)}", "keep")
        return self


class Manifest(StrictModel):
    """A trolley-etl manifest, version 1."""

    SCHEMA_TITLE: ClassVar[str] = "trolley-etl manifest"

    version: Literal[1] = Field(description="manifest format version")
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        max_length=100,
        description="identifies the extraction in logs and reports",
    )
    description: str | None = None
    source: Source
    queries: list[QuerySet] = Field(min_length=1)
    select: Select | None = None
    storage: Storage
    run: RunSettings = Field(default_factory=RunSettings)
    deid: Deid | None = Field(default=None, description="de-identification (PS3.15 Annex E)")

    _base_dir: Path = PrivateAttr(default=Path("."))

    @field_validator("version", mode="before")
    @classmethod
    def _check_version(cls, version: Any) -> Any:
        if version != MANIFEST_VERSION:
            raise PydanticCustomError(
                "version",
                "unsupported manifest version {version}: this trolley-etl reads version 1",
                {"version": version},
            )
        return version

    @field_validator("queries")
    @classmethod
    def _unique_names(cls, queries: list[QuerySet]) -> list[QuerySet]:
        seen: dict[str, int] = {}
        for index, query_set in enumerate(queries):
            if query_set.name in seen:
                raise error(
                    "duplicate_name",
                    f"query set name {query_set.name!r} is already used by "
                    f"queries[{seen[query_set.name]}]",
                    index,
                    "name",
                )
            seen[query_set.name] = index
        return queries

    @model_validator(mode="after")
    def _remember_base_dir(self, info: ValidationInfo) -> Manifest:
        self._base_dir = Path((info.context or {}).get("base_dir", ".")).absolute()
        return self

    @model_validator(mode="after")
    def _check_pseudonym_map(self, info: ValidationInfo) -> Manifest:
        if self.deid is not None and self.deid.pseudonym_map:
            base = Path((info.context or {}).get("base_dir", ".")).absolute()
            target = (base / self.deid.pseudonym_map).resolve()
            root = (base / self.storage.root).resolve()
            if target == root or root in target.parents:
                raise error(
                    "pseudonym_map",
                    "must lie outside storage.root (the export)",
                    "deid",
                    "pseudonym_map",
                )
        return self

    @model_validator(mode="after")
    def _check_deid_format(self) -> Manifest:
        # the de-identification step rewrites Part 10 files; DICOM JSON files would leave as
        # the archive sent them, so the two are refused together rather than half-applied
        if self.deid is not None and self.source.file_format == "json":
            raise error(
                "deid",
                "de-identification works on Part 10 files: use the default "
                "`format: dicom` for metadata-only pulls with `deid`",
                "deid",
            )
        return self

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    @property
    def object_root(self) -> str | None:
        """`storage.root` when it is object storage (s3://...), else None."""
        return self.storage.root if self.storage.root.startswith("s3://") else None

    @property
    def storage_root(self) -> Path:
        """`storage.root`, resolved against the manifest's folder; for an object-storage
        root, the local folder of its checkpoint, logs and reports (`run.state_dir`)."""
        if self.object_root is not None:
            return (self._base_dir / (self.run.state_dir or f"{self.name}.state")).resolve()
        return (self._base_dir / self.storage.root).resolve()
