"""What every HTTP backend shares: one pooled session, auth, TLS, and clear errors.

Every failure becomes a project error naming the URL (without credentials), the status and
the server's own message, never a bare requests traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import json
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase, HTTPBasicAuth

from trolley_etl import __version__
from trolley_etl.backends.limits import BackendLimits
from trolley_etl.core.errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    ConnectionFailedError,
    CredentialsUnsendableError,
    ObjectNotFoundError,
    ResponseTooLargeError,
)
from trolley_etl.core.interrupts import on_abort
from trolley_etl.core.outage import OutageGate

if TYPE_CHECKING:
    from typing_extensions import TypedDict

#: (connect, read) seconds; the read timeout is between bytes, not for a whole study.
DEFAULT_TIMEOUT = (10.0, 300.0)
#: Seconds one streamed answer may take in total, however steadily the server trickles.
DEFAULT_DEADLINE = 7200.0
#: (connect, read) seconds for the probe that tells an outage from one failing request.
PROBE_TIMEOUT = (5.0, 10.0)
#: Largest answer read into memory (search pages, metadata), in bytes.
DEFAULT_MAX_ANSWER_BYTES = 64 << 20
DEFAULT_POOL_SIZE = 16
#: Bytes read from the socket at a time; bounds the memory one retrieval uses.
CHUNK_SIZE = 1 << 20
USER_AGENT = f"trolley-etl/{__version__}"
#: Characters left literal in query values. DICOM matching needs `*`, `?`, `,`, `^`, `/` and `-`,
#: and some servers (Orthanc among them) compare the raw text without percent-decoding it.
QUERY_SAFE = "*?,/^-._~:@!$'()"

Auth = tuple[str, str] | AuthBase | None
Timeout = float | tuple[float, float]
ClientCertificate = str | tuple[str, str] | None


@dataclass(frozen=True)
class HttpSettings:
    """Where an HTTP archive is and how to talk to it: credentials, TLS, waits and caps.

    The one description of an HTTP connection that DICOMweb, WADO-URI, MINT and RAD-69
    backends share, whether the manifest built it (`HttpBackend.http_settings`) or a caller
    did; `client()` turns it into the pooled session the backend talks through.
    """

    url: str
    auth: Auth = None
    #: False to skip TLS verification, or the path of a CA bundle.
    verify: bool | str = True
    #: (connect, read) seconds; the read timeout is between bytes.
    timeout: Timeout = DEFAULT_TIMEOUT
    #: Client certificate for mutual TLS: one PEM file, or (certificate, key).
    cert: ClientCertificate = None
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Seconds one streamed answer may take in total.
    deadline: float | None = DEFAULT_DEADLINE
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    #: Caps shared by every request of the backend (see `backends.limits`).
    limits: BackendLimits | None = field(default=None, compare=False)

    def client(self, session: requests.Session | None = None) -> HttpClient:
        """The pooled client; `session` is the caller's own (proxies, adapters, cookies)."""
        return HttpClient(
            self.url,
            auth=self.auth,
            verify=self.verify,
            timeout=self.timeout,
            headers=dict(self.headers),
            session=session,
            deadline=self.deadline,
            max_answer_bytes=self.max_answer_bytes,
            limits=self.limits,
            cert=self.cert,
        )

    def describe(self) -> str:
        """The URL without credentials, for logs and reports."""
        return redact_url(self.url)


if TYPE_CHECKING:

    class HttpOptions(TypedDict, total=False):
        """The fields of HttpSettings after `url`, as keyword arguments of a backend."""

        auth: Auth
        verify: bool | str
        timeout: Timeout
        cert: ClientCertificate
        headers: Mapping[str, str] | None
        deadline: float | None
        max_answer_bytes: int
        limits: BackendLimits | None


def http_settings(target: str | HttpSettings, options: HttpOptions) -> HttpSettings:
    """`target` if it is settings already, else settings for the URL `target` and `options`."""
    if isinstance(target, HttpSettings):
        if options:
            raise ConfigurationError(
                f"give either HttpSettings or {', '.join(sorted(options))}, not both"
            )
        return target
    if options.get("headers") is None:
        options = {**options, "headers": {}}
    return HttpSettings(target, **options)  # type: ignore[arg-type]


class BearerAuth(AuthBase):
    """`Authorization: Bearer TOKEN`. The token never appears in repr or errors."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """Add the header to the request."""
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
        """Send within the caps: wait for the request rate, count a body read at once."""
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
        deadline: float | None = DEFAULT_DEADLINE,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        limits: BackendLimits | None = None,
        cert: str | tuple[str, str] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(f"not an http(s) URL: {redact_url(base_url)!r}", url=base_url)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.deadline = deadline
        self.max_answer_bytes = max_answer_bytes
        #: Shared by the clients of one run to wait out an archive outage (core.outage).
        self.outage: OutageGate | None = None
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
        """The full URL of `path` below the base URL (a query string is appended as is)."""
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
        """One request; failures to get any answer become ConnectionFailedError.

        A streamed answer is watched until it is closed: past `deadline` seconds, or when
        `abort_transfers` is called (SIGINT/SIGTERM), its socket is shut down so that a
        read blocked on a stalled server returns at once.
        """
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                response = self._request(method, url, **kwargs)
            except ConnectionFailedError as exc:
                if self.outage is not None and self.outage.should_retry(
                    self.probe, attempt, error=exc
                ):
                    continue  # the archive is down: wait for it (core.outage)
                raise
            status = response.status_code
            if status >= 500 and self.outage is not None:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if self.outage.should_retry(
                    self.probe, attempt, status=status, retry_after=retry_after
                ):
                    response.close()
                    continue
            elif self.outage is not None:
                self.outage.answered()
            if kwargs.get("stream") and self.deadline is not None:
                WATCHDOG.watch(response, started + self.deadline, self.deadline)
            return response

    def probe(self) -> bool:
        """Does the archive answer at all (any status below 500 at its base URL)?"""
        try:
            with self.session.get(self.base_url + "/", timeout=PROBE_TIMEOUT, stream=True) as r:
                return r.status_code < 500
        except (requests.exceptions.RequestException, ValueError):
            return False

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            # verify given per request: requests lets REQUESTS_CA_BUNDLE override the
            # session's own setting otherwise, and a private CA would be ignored
            return self.session.request(
                method, url, timeout=self.timeout, verify=self.session.verify, **kwargs
            )
        except UnicodeError:  # e.g. a header value (credentials) that is not Latin-1
            raise CredentialsUnsendableError(
                f"{redact_url(url)}: the credentials or headers cannot be sent: they must be "
                "Latin-1 text without control characters",
                url=url,
            ) from None
        except ValueError as exc:
            if "header" not in str(exc).lower():
                raise
            raise CredentialsUnsendableError(
                f"{redact_url(url)}: the credentials or headers cannot be sent (a header value "
                "holds a line break or control character)",
                url=url,
            ) from None
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

    def get_bounded(
        self,
        path: str,
        *,
        params: Iterable[tuple[str, object]] | dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[requests.Response, bytes]:
        """GET an answer that is read into memory, at most `max_answer_bytes` of it."""
        response = self.get(path, params=params, headers=headers, stream=True)
        with response:
            return response, read_bounded(response, response.url, self.max_answer_bytes)

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()


def encode_query(params: Iterable[tuple[str, object]] | dict[str, object]) -> str:
    """A query string that keeps DICOM matching characters literal (see QUERY_SAFE)."""
    pairs = params.items() if isinstance(params, dict) else params
    return "&".join(f"{quote(str(k), safe='')}={quote(str(v), safe=QUERY_SAFE)}" for k, v in pairs)


def raise_for_status(response: requests.Response) -> None:
    """Raise the project error for a non-2xx answer, naming URL, status and message."""
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
    try:  # never more than 20 kB of it, whatever the server sends
        consumed = getattr(response, "_content_consumed", False)
        raw = response.content if consumed else response.raw.read(20_000, decode_content=True)
        body = (raw or b"")[:20_000].decode("utf-8", "replace")
    except (requests.exceptions.RequestException, OSError, ValueError):
        return ""
    except Exception:  # urllib3 errors of a broken body: the status says enough
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
    """The body in CHUNK_SIZE pieces; a dropped connection becomes a project error, and so
    does a transfer the watchdog cut (deadline passed, run interrupted).

    Pieces count against the backend's byte rate, if it has one.
    """
    limits = getattr(response.connection, "limits", None)
    try:
        for chunk in response.iter_content(chunk_size=CHUNK_SIZE):
            if limits is not None:
                limits.received(len(chunk))
            yield chunk
    except requests.exceptions.RequestException as exc:
        _raise_if_cut(response, url)
        raise ConnectionFailedError(
            f"{redact_url(url)}: connection lost while downloading: {_reason(exc)}", url=url
        ) from None
    _raise_if_cut(response, url)  # a cut socket can look like a clean end of the body


def read_bounded(response: requests.Response, url: str, limit: int) -> bytes:
    """The whole body, or ResponseTooLargeError as soon as it grows past `limit` bytes."""
    body = bytearray()
    for chunk in iter_body(response, url):
        body += chunk
        if len(body) > limit:
            raise ResponseTooLargeError(
                f"{redact_url(url)}: the answer is larger than {limit >> 20} MiB "
                "(run.limits.max_search_answer_mb)",
                url=url,
            )
    return bytes(body)


def _raise_if_cut(response: requests.Response, url: str) -> None:
    reason = WATCHDOG.cut_reason(response)
    if reason is not None:
        raise ConnectionFailedError(f"{redact_url(url)}: {reason}", url=url)


class _Watchdog:
    """Cuts streamed answers that pass their deadline, or all of them on `abort_all`.

    requests' timeout is the wait between two reads, so a server sending a byte every few
    seconds would hold a worker forever, and a read blocked on a stalled server would keep
    SIGTERM waiting for the whole read timeout. Shutting the socket down makes that read
    return at once; the reader then sees the reason (`cut_reason`).
    """

    POLL = 0.25

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[weakref.ref[requests.Response], float, float]] = {}
        self._cut: weakref.WeakKeyDictionary[requests.Response, str] = weakref.WeakKeyDictionary()
        self._thread: threading.Thread | None = None

    def watch(self, response: requests.Response, until: float, seconds: float) -> None:
        with self._lock:
            self._watched[id(response)] = (weakref.ref(response), until, seconds)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="http-deadline", daemon=True
                )
                self._thread.start()

    def cut_reason(self, response: requests.Response) -> str | None:
        with self._lock:
            return self._cut.get(response)

    def abort_all(self, reason: str = "the transfer was stopped (interrupted)") -> int:
        """Cut every open streamed answer now; returns how many were cut."""
        with self._lock:
            entries = list(self._watched.items())
        return sum(self._cut_one(key, ref, reason) for key, (ref, _, _) in entries)

    def _loop(self) -> None:
        while True:
            time.sleep(self.POLL)
            now = time.monotonic()
            with self._lock:
                entries = list(self._watched.items())
            for key, (ref, until, seconds) in entries:
                response = ref()
                if response is None or _finished(response):
                    with self._lock:
                        self._watched.pop(key, None)
                elif now > until:
                    reason = f"the answer took longer than the deadline of {seconds:g} s"
                    self._cut_one(key, ref, reason + " (run.limits.request_deadline)")

    def _cut_one(self, key: int, ref: weakref.ref[requests.Response], reason: str) -> bool:
        response = ref()
        with self._lock:
            self._watched.pop(key, None)
            if response is None or _finished(response):
                return False
            self._cut[response] = reason
        sock = _socket_of(response)
        if sock is None:
            return False
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return True


def _finished(response: requests.Response) -> bool:
    raw = getattr(response, "raw", None)
    return raw is None or getattr(raw, "_connection", None) is None or bool(raw.closed)


def _socket_of(response: requests.Response) -> socket.socket | None:
    connection = getattr(response.raw, "_connection", None)
    sock = getattr(connection, "sock", None)
    return sock if isinstance(sock, socket.socket) else None


WATCHDOG = _Watchdog()


def abort_transfers() -> int:
    """Cut every streamed answer in flight (the run is stopping); see `_Watchdog`."""
    return WATCHDOG.abort_all()


on_abort(abort_transfers)
