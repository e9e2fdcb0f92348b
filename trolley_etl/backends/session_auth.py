"""Vendor session logins: Vitrea Connection and AGFA IMPAX Data Center, as requests auth.

Both products authenticate a session, not each request: one login gives a session cookie, and
the archive answers as if logged out once that session ends. These auth objects log in once
(under a lock, on the first request), give the cookie to every request of every thread that
uses them, and when the archive says the session ended they log in again, once, and resend
that request (a session cookie past its expiry time is renewed before the request instead).
Neither the credentials nor the cookie is ever logged, printed or put in an error.

Recorded behaviour of the products (the tests' servers answer the same way):

- Vitrea: `POST login_url` with `X-Userid`, `X-Password`, `X-Realm` headers; success is 200
  with a session cookie, failure 401. A request without a valid session answers 401.
- IMPAX: `GET login_url` opens a session, then a form `POST login_url/j_security_check` with
  `j_username` and `j_password`; success is answered with 403 (the servlet's landing page is
  forbidden) or a redirect, failure with 200 and an error page ("Login Failed!"). A request
  whose session ended gets the login page: 200, text/html, a form posting to
  `j_security_check`.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.auth import AuthBase
from requests.cookies import RequestsCookieJar, get_cookie_header

from trolley_etl.backends.http import USER_AGENT, redact_url
from trolley_etl.core.errors import AuthenticationError, BackendError, ConnectionFailedError

#: (connect, read) seconds for a login request.
LOGIN_TIMEOUT = (10.0, 60.0)
#: How much of an HTML answer is read to tell a login page from another page.
LOGIN_PAGE_PEEK = 64 * 1024
DEFAULT_REALM = "DefaultSystemRealm"


class SessionAuth(AuthBase):
    """Log in once, share the session cookie between threads, log in again once when the
    session ends. Subclasses say how to log in and how an ended session looks."""

    product = "session"

    def __init__(
        self,
        login_url: str,
        username: str,
        password: str,
        *,
        verify: bool | str = True,
        cert: str | tuple[str, str] | None = None,
        timeout: float | tuple[float, float] = LOGIN_TIMEOUT,
    ) -> None:
        parts = urlsplit(login_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(f"not an http(s) login URL: {redact_url(login_url)!r}")
        self.login_url = login_url.rstrip("/")
        self._username = username
        self._password = password
        self._timeout = timeout
        self._session = requests.Session()
        self._session.verify = verify
        self._session.cert = cert
        self._session.headers["User-Agent"] = USER_AGENT
        self._lock = threading.Lock()
        self._cookies: RequestsCookieJar | None = None
        self._generation = 0
        #: Logins done so far (the first one and each renewal).
        self.logins = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.login_url!r}, ***)"

    # --- what a subclass provides ------------------------------------------------------------

    def _log_in(self, session: requests.Session) -> None:
        """Log in with `session`; raise AuthenticationError when refused."""
        raise NotImplementedError

    def session_ended(self, response: requests.Response) -> bool:
        """True when the answer says the session is no longer valid."""
        return response.status_code == 401

    # --- the session -----------------------------------------------------------------------

    def ensure_login(self) -> None:
        """Log in now unless logged in (the runner does, so that refused credentials stop it
        before anything else happens)."""
        self._current()

    def _renew(self) -> None:
        """Log in with a fresh cookie jar; the lock is held."""
        self._session.cookies.clear()
        try:
            self._log_in(self._session)
        except requests.exceptions.RequestException as exc:
            raise ConnectionFailedError(
                f"cannot reach the {self.product} login at {redact_url(self.login_url)}: "
                f"{type(exc).__name__}",
                url=self.login_url,
            ) from None
        if not len(self._session.cookies):
            raise AuthenticationError(
                f"{redact_url(self.login_url)}: the {self.product} login answered without a "
                "session cookie",
                url=self.login_url,
            )
        jar = RequestsCookieJar()
        jar.update(self._session.cookies)
        self._cookies = jar
        self._generation += 1
        self.logins += 1

    def _current(self) -> tuple[int, RequestsCookieJar]:
        with self._lock:
            if self._cookies is not None:
                self._cookies.clear_expired_cookies()
                if not len(self._cookies):
                    self._cookies = None  # the session cookie expired: log in before sending
            if self._cookies is None:
                self._renew()
            assert self._cookies is not None
            return self._generation, self._cookies

    def _renewed(self, seen: int) -> tuple[int, RequestsCookieJar, bool]:
        """A session newer than generation `seen`, and whether this call logged in for it
        (it does not when another thread already renewed the session)."""
        with self._lock:
            logged_in = self._generation == seen or self._cookies is None
            if logged_in:
                self._renew()
            assert self._cookies is not None
            return self._generation, self._cookies, logged_in

    # --- requests' auth protocol -----------------------------------------------------------

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        generation, jar = self._current()
        _attach(request, jar)
        request._trolley_session = generation  # type: ignore[attr-defined]
        request.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return request

    def _on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        """A request whose session ended is sent again with a renewed session. Each request
        logs in once at most; it may first try a session another thread just renewed."""
        request = response.request
        if getattr(request, "_trolley_retried", False) or not self.session_ended(response):
            return response
        seen = getattr(request, "_trolley_session", 0)
        for _ in range(2):
            _discard(response)
            generation, jar, logged_in = self._renewed(seen)
            retry = request.copy()
            _attach(retry, jar)
            retry._trolley_retried = True  # type: ignore[attr-defined]
            retry._trolley_session = generation  # type: ignore[attr-defined]
            previous = response
            response = previous.connection.send(retry, **kwargs)
            response.history.append(previous)
            response.request = retry
            if not self.session_ended(response):
                return response
            if logged_in:
                break
            seen = generation
        _discard(response)
        url = redact_url(response.request.url or "")
        raise AuthenticationError(
            f"{url}: {self.product} ended the session again right after a new login (the user "
            "may lack access to this resource)",
            url=url,
            status=response.status_code,
        )


def _attach(request: requests.PreparedRequest, jar: RequestsCookieJar) -> None:
    """Put the session's cookies on a request, replacing any of the same names (a cookie the
    archive set on an unauthenticated answer must not shadow the logged-in one)."""
    existing = request.headers.pop("Cookie", None) or ""  # the jar would not add to it
    ours = get_cookie_header(jar, request) or ""  # type: ignore[no-untyped-call]
    names = {cookie.name for cookie in jar}
    kept = [
        part.strip()
        for part in existing.split(";")
        if part.strip() and part.split("=", 1)[0].strip() not in names
    ]
    if kept or ours:
        request.headers["Cookie"] = "; ".join([*kept, *([ours] if ours else [])])


def _discard(response: requests.Response) -> None:
    """Drop an answer that is about to be replaced, reading at most a little of it."""
    try:
        if not response._content_consumed:  # type: ignore[attr-defined]
            response.raw.read(LOGIN_PAGE_PEEK, decode_content=False)
    except Exception:
        pass
    response.close()


def _refused(product: str, url: str, response: requests.Response, detail: str) -> BackendError:
    status = response.status_code
    where = redact_url(url)
    if status >= 500 or status == 429:
        return BackendError(
            f"{where}: the {product} login failed: HTTP {status} {response.reason or ''}".rstrip(),
            url=where,
            status=status,
        )
    return AuthenticationError(
        f"{where}: {product} refused the login ({detail}); check the user name and password "
        "in the environment variables the manifest names",
        url=where,
        status=status,
    )


class VitreaAuth(SessionAuth):
    """Vitrea Connection: a header login and a cookie session (see the module docstring)."""

    product = "Vitrea"

    def __init__(
        self,
        login_url: str,
        username: str,
        password: str,
        realm: str = DEFAULT_REALM,
        **options: Any,
    ) -> None:
        super().__init__(login_url, username, password, **options)
        self.realm = realm

    def _log_in(self, session: requests.Session) -> None:
        headers = {"X-Userid": self._username, "X-Password": self._password, "X-Realm": self.realm}
        with session.post(
            self.login_url,
            headers=headers,
            timeout=self._timeout,
            stream=True,
            allow_redirects=False,
        ) as response:
            response.raw.read(LOGIN_PAGE_PEEK)
            if response.status_code != 200:
                raise _refused(
                    self.product,
                    self.login_url,
                    response,
                    f"HTTP {response.status_code} {response.reason or ''}".rstrip(),
                )


class ImpaxAuth(SessionAuth):
    """AGFA IMPAX Data Center: a servlet form login (see the module docstring).

    `login_url` is the web application the session is opened at (the WADO endpoint); the
    form goes to `login_url/j_security_check`. A URL that already ends in `j_security_check`
    is taken as the form's address.
    """

    product = "IMPAX"

    def __init__(self, login_url: str, username: str, password: str, **options: Any) -> None:
        super().__init__(login_url, username, password, **options)
        if self.login_url.endswith("/j_security_check"):
            self.app_url = self.login_url.removesuffix("/j_security_check")
        else:
            self.app_url = self.login_url
        self.form_url = f"{self.app_url}/j_security_check"

    def _log_in(self, session: requests.Session) -> None:
        with session.get(self.app_url, timeout=self._timeout, stream=True) as opened:
            opened.raw.read(LOGIN_PAGE_PEEK)  # the servlet only accepts a form for a session
        form = {"j_username": self._username, "j_password": self._password}
        with session.post(
            self.form_url, data=form, timeout=self._timeout, stream=True, allow_redirects=False
        ) as response:
            page = response.raw.read(LOGIN_PAGE_PEEK, decode_content=True) or b""
            if response.status_code == 403 or 300 <= response.status_code < 400:
                return  # IMPAX answers a successful login with 403, other servlets redirect
            detail = (
                "the login page answered Login Failed"
                if b"Login Failed" in page
                else (f"HTTP {response.status_code} {response.reason or ''}".rstrip())
            )
            raise _refused(self.product, self.form_url, response, detail)

    def session_ended(self, response: requests.Response) -> bool:
        if response.status_code == 401:
            return True
        content_type = response.headers.get("Content-Type", "")
        if response.status_code != 200 or not content_type.startswith("text/html"):
            return False
        # no protocol this project speaks answers HTML: this is the login page, or an error
        page = response.raw.read(LOGIN_PAGE_PEEK, decode_content=True) or b""
        response._content = page  # bounded; read by error messages
        response._content_consumed = True  # type: ignore[attr-defined]
        return b"j_security_check" in page


#: Session auth objects in use, so a search and a download backend with the same login share
#: one session (one login, one cookie) instead of logging in twice.
_SHARED: weakref.WeakValueDictionary[tuple[Any, ...], SessionAuth] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def session_auth_from_env(
    kind: str,
    *,
    login_url: str,
    username_env: str,
    password_env: str,
    realm: str = DEFAULT_REALM,
    verify: bool | str = True,
    cert: str | tuple[str, str] | None = None,
) -> SessionAuth:
    """The Vitrea or IMPAX auth for these settings, credentials read from the environment;
    the same object for the same settings while one is in use."""

    def read(name: str) -> str:
        value = os.environ.get(name)
        if value is None:
            raise BackendError(f"environment variable {name} is not set")
        return value

    username, password = read(username_env), read(password_env)
    key = (kind, login_url, username, password, realm, verify, cert)
    with _SHARED_LOCK:
        shared = _SHARED.get(key)
        if shared is not None:
            return shared
        auth: SessionAuth
        if kind == "vitrea":
            auth = VitreaAuth(login_url, username, password, realm, verify=verify, cert=cert)
        elif kind == "impax":
            auth = ImpaxAuth(login_url, username, password, verify=verify, cert=cert)
        else:
            raise BackendError(f"unknown session auth type {kind!r} (vitrea or impax)")
        _SHARED[key] = auth
        return auth
