"""What every HTTP backend shares: one pooled session, auth, TLS, and clear errors.

Every failure becomes a project error naming the URL (without credentials), the status and
the server's own message, never a bare requests traceback.
"""

from __future__ import annotations

import datetime
import email.utils
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase, HTTPBasicAuth

from trolley_etl import __version__
from trolley_etl.backends.limits import BackendLimits
from trolley_etl.core.errors import (
    AuthenticationError,
    BackendError,
    ConnectionFailedError,
    ObjectNotFoundError,
)

#: (connect, read) seconds; the read timeout is between bytes, not for a whole study.
DEFAULT_TIMEOUT = (10.0, 300.0)
DEFAULT_POOL_SIZE = 16
#: Bytes read from the socket at a time; bounds the memory one retrieval uses.
CHUNK_SIZE = 1 << 20
USER_AGENT = f"trolley-etl/{__version__}"
#: Characters left literal in query values. DICOM matching needs `*`, `?`, `,`, `^`, `/` and `-`,
#: and some servers (Orthanc among them) compare the raw text without percent-decoding it.
QUERY_SAFE = "*?,/^-._~:@!$'()"

Auth = tuple[str, str] | AuthBase | None


class BearerAuth(AuthBase):
    """`Authorization: Bearer TOKEN`. The token never appears in repr or errors."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "BearerAuth(***)"


def auth_from_env(
    kind: str,
    *,
    username_env: str | None = None,
    password_env: str | None = None,
    token_env: str | None = None,
) -> AuthBase | None:
    """Build basic or bearer auth from environment variables (secrets never live in files)."""

    def read(name: str | None) -> str:
        if not name:
            raise BackendError(f"{kind} auth needs the name of an environment variable")
        value = os.environ.get(name)
        if value is None:
            raise BackendError(f"environment variable {name} is not set")
        return value

    if kind == "none":
        return None
    if kind == "basic":
        return HTTPBasicAuth(read(username_env), read(password_env))
    if kind == "bearer":
        return BearerAuth(read(token_env))
    raise BackendError(f"unknown auth type {kind!r} (none, basic or bearer)")


def redact_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class LimitedAdapter(HTTPAdapter):
    """A connection pool that enforces a backend's caps.

    With `max_connections` the pool holds that many connections and a request waits for a
    free one (urllib3's blocking pool), so no more are ever open at once; each request waits
    for the request rate; bodies read at once count against the byte rate here, streamed
    ones in `iter_body` (which finds the limits through `response.connection`).
    """

    def __init__(self, limits: BackendLimits | None = None, pool_size: int = DEFAULT_POOL_SIZE):
        self.limits = limits
        capped = limits is not None and limits.max_connections is not None
        size = limits.max_connections if limits and limits.max_connections else pool_size
        super().__init__(pool_connections=size, pool_maxsize=size, pool_block=capped)

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, stream: bool = False, **kwargs: Any
    ) -> requests.Response:
        if self.limits is not None:
            self.limits.request()
        response = super().send(request, stream=stream, **kwargs)
        if self.limits is not None and not stream:
            self.limits.received(len(response.content))
        return response


class HttpClient:
    """A pooled, authenticated session bound to one base URL.

    `limits` caps connections, requests and bytes per second (see `backends.limits`);
    `cert` is a client certificate for mutual TLS: a PEM file holding certificate and key,
    or a (certificate, key) pair of files.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: Auth = None,
        verify: bool | str = True,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        pool_size: int = DEFAULT_POOL_SIZE,
        headers: dict[str, str] | None = None,
        session: requests.Session | None = None,
        limits: BackendLimits | None = None,
        cert: str | tuple[str, str] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(f"not an http(s) URL: {redact_url(base_url)!r}", url=base_url)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.session = session or requests.Session()
        self.pool_size = pool_size
        self.limits: BackendLimits | None = None
        self.configure(limits=limits, cert=cert)
        self.session.verify = verify
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.headers.update(headers or {})
        if isinstance(auth, tuple):
            auth = HTTPBasicAuth(*auth)
        self.session.auth = auth

    def configure(
        self, *, limits: BackendLimits | None = None, cert: str | tuple[str, str] | None = None
    ) -> None:
        """Set the caps and the client certificate (also after construction)."""
        self.limits = limits
        adapter = LimitedAdapter(limits, self.pool_size)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if cert is not None:
            self.session.cert = cert

    def url(self, path: str) -> str:
        if not path or path.startswith("?"):
            return self.base_url + path
        return f"{self.base_url}/{path.lstrip('/')}"

    def get(
        self,
        path: str,
        *,
        params: Iterable[tuple[str, object]] | dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """GET and raise a project error for anything but a 2xx answer."""
        url = self.url(path)
        if params:
            url += ("&" if "?" in url else "?") + encode_query(params)
        response = self._send("GET", url, headers=headers, stream=stream)
        raise_for_status(response)
        return response

    def post(
        self,
        path: str,
        *,
        data: bytes,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        check: bool = True,
    ) -> requests.Response:
        """POST `data`; with `check=False` error answers are returned, not raised.

        SOAP services (RAD-69) answer faults with HTTP 500 and a SOAP envelope that says
        more than the status does, so their callers read the body before deciding.
        """
        response = self._send("POST", self.url(path), data=data, headers=headers, stream=stream)
        if check:
            raise_for_status(response)
        return response

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request; failures to get any answer become ConnectionFailedError."""
        try:
            # verify given per request: requests lets REQUESTS_CA_BUNDLE override the
            # session's own setting otherwise, and a private CA would be ignored
            return self.session.request(
                method, url, timeout=self.timeout, verify=self.session.verify, **kwargs
            )
        except requests.exceptions.SSLError as exc:
            raise ConnectionFailedError(
                f"TLS verification failed for {redact_url(url)}: {_reason(exc)}", url=url
            ) from None
        except requests.exceptions.Timeout:
            raise ConnectionFailedError(
                f"timed out waiting for {redact_url(url)}", url=url
            ) from None
        except requests.exceptions.RequestException as exc:
            raise ConnectionFailedError(
                f"cannot reach {redact_url(url)}: {_reason(exc)}", url=url
            ) from None

    def close(self) -> None:
        self.session.close()


def encode_query(params: Iterable[tuple[str, object]] | dict[str, object]) -> str:
    """A query string that keeps DICOM matching characters literal (see QUERY_SAFE)."""
    pairs = params.items() if isinstance(params, dict) else params
    return "&".join(f"{quote(str(k), safe='')}={quote(str(v), safe=QUERY_SAFE)}" for k, v in pairs)


def raise_for_status(response: requests.Response) -> None:
    if response.status_code < 400:
        return
    url = redact_url(response.url)
    status = response.status_code
    message = server_message(response)
    text = f"{url}: HTTP {status} {response.reason or ''}".rstrip()
    if message:
        text += f": {message}"
    response.close()
    if status in (401, 403):
        raise AuthenticationError(
            f"{text} (the server refused the credentials)", url=url, status=status
        )
    if status == 404:
        raise ObjectNotFoundError(text, url=url, status=status)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    raise BackendError(text, url=url, status=status, retry_after=retry_after)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def server_message(response: requests.Response, limit: int = 300) -> str:
    """The server's explanation of an error, short and on one line."""
    try:
        body = response.content[:20_000].decode("utf-8", "replace")
    except requests.exceptions.RequestException:
        return ""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        pieces = [
            str(parsed[k]) for k in ("Message", "Details", "message", "error") if parsed.get(k)
        ]
        body = " - ".join(pieces) or body
    text = " ".join(body.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(exc: Exception) -> str:
    """A short reason from a requests exception, without the noisy urllib3 wrapper text."""
    text = str(exc)
    for marker in (
        "Connection refused",
        "Name or service not known",
        "timed out",
        "No route to host",
        "certificate verify failed",
        "Connection reset",
    ):
        if marker in text:
            return marker
    return text if len(text) <= 200 else text[:197] + "..."


def iter_body(response: requests.Response, url: str) -> Iterator[bytes]:
    """The body in CHUNK_SIZE pieces; a dropped connection becomes a project error.

    Pieces count against the backend's byte rate, if it has one.
    """
    limits = getattr(response.connection, "limits", None)
    try:
        for chunk in response.iter_content(chunk_size=CHUNK_SIZE):
            if limits is not None:
                limits.received(len(chunk))
            yield chunk
    except requests.exceptions.RequestException as exc:
        raise ConnectionFailedError(
            f"{redact_url(url)}: connection lost while downloading: {_reason(exc)}", url=url
        ) from None
