"""Vendor login gates in front of a real archive, answering as Vitrea and IMPAX do.

No installable server logs in the way these products do, so this small proxy plays their
login and session handling (recorded in `trolley_etl.backends.session_auth`) and forwards every
request of a valid session to a real Orthanc. Sessions can be ended at will or after a number
of requests, to test a session that expires in the middle of a run. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import requests

from trolley_etl._harness.proxy import HOP_BY_HOP

VITREA_401 = (
    b"<html><head><title>Error 401 you need to log in to access this page.</title></head>"
    b"<body><h2>HTTP ERROR 401</h2></body></html>"
)
IMPAX_LOGIN_PAGE = (
    b'<html><body><form method="POST" action="j_security_check">'
    b'<input name="j_username"/><input type="password" name="j_password"/></form></body></html>'
)
IMPAX_LOGIN_FAILED = b"<html><body>lots of content and then: Login Failed! etc.</body></html>"
IMPAX_DENIED = b"<html> Access to the requested resource has been denied </html>"


class VendorLoginProxy:
    """`product` is "vitrea" or "impax"; `users` maps user names to passwords.

    Vitrea logs in at `/login`, IMPAX at `/impax` (+ `/j_security_check`); everything else is
    forwarded to `upstream` for a valid session. `session_requests` ends each session after
    that many forwarded requests (0: never).
    """

    def __init__(
        self,
        upstream: str,
        product: str,
        users: dict[str, str],
        *,
        realm: str = "DefaultSystemRealm",
        session_requests: int = 0,
        cookie_max_age: int | None = None,
    ) -> None:
        if product not in ("vitrea", "impax"):
            raise ValueError(product)
        self.upstream = upstream.rstrip("/")
        self.product = product
        self.users = dict(users)
        self.realm = realm
        self.session_requests = session_requests
        self.cookie_max_age = cookie_max_age  # Max-Age of session cookies; they end with it
        self.unauthenticated = 0  # requests answered as logged out (401 or the login page)
        self.logins: list[str] = []  # user of each successful login
        self.refused_logins = 0
        self.ended_sessions = 0
        self.seen_headers: list[dict[str, str]] = []  # headers of every forwarded request
        self._sessions: dict[str, int] = {}  # session id -> forwarded requests
        self._opened: dict[str, float] = {}  # session id -> when it was opened
        self._anonymous: set[str] = set()  # IMPAX sessions opened but not logged in
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy._handle(self, "GET")

            def do_POST(self) -> None:
                proxy._handle(self, "POST")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.login_url = f"{self.url}/login" if product == "vitrea" else f"{self.url}/impax"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def end_sessions(self) -> None:
        """Every session expires now (as after an idle timeout)."""
        with self._lock:
            self.ended_sessions += len(self._sessions)
            self._sessions.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> VendorLoginProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- answers ---------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        path = urlsplit(handler.path).path
        session = _cookie(handler.headers.get("Cookie", ""), "JSESSIONID")
        if self.product == "vitrea" and path == "/login" and method == "POST":
            self._vitrea_login(handler)
        elif self.product == "impax" and path == "/impax" and method == "GET":
            new = secrets.token_hex(16)
            with self._lock:
                self._anonymous.add(new)
            _answer(handler, 200, IMPAX_LOGIN_PAGE, cookie=new)
        elif self.product == "impax" and path == "/impax/j_security_check":
            form = dict(
                parse_qsl(body.decode() if method == "POST" else urlsplit(handler.path).query)
            )
            self._impax_login(handler, session, form)
        elif self._valid(session):
            self._forward(handler)
        elif self.product == "vitrea":
            self.unauthenticated += 1
            _answer(handler, 401, VITREA_401)
        else:
            self.unauthenticated += 1
            new = secrets.token_hex(16)
            with self._lock:
                self._anonymous.add(new)
            _answer(handler, 200, IMPAX_LOGIN_PAGE, cookie=new)

    def _vitrea_login(self, handler: BaseHTTPRequestHandler) -> None:
        user = handler.headers.get("X-Userid", "")
        good = (
            user in self.users
            and handler.headers.get("X-Password") == self.users[user]
            and handler.headers.get("X-Realm") == self.realm
        )
        if not good:
            with self._lock:
                self.refused_logins += 1
            _answer(handler, 401, VITREA_401)
            return
        session = self._open_session(user)
        _answer(
            handler,
            200,
            b'{"token": "ignored by the server"}',
            cookie=session,
            content_type="application/json",
            max_age=self.cookie_max_age,
        )

    def _impax_login(
        self, handler: BaseHTTPRequestHandler, session: str | None, form: dict[str, str]
    ) -> None:
        user = form.get("j_username", "")
        with self._lock:
            opened = session in self._anonymous
        if not opened or self.users.get(user) != form.get("j_password") or user not in self.users:
            with self._lock:
                self.refused_logins += 1
            _answer(handler, 200, IMPAX_LOGIN_FAILED)
            return
        with self._lock:
            self._anonymous.discard(session or "")
        new = self._open_session(user)  # the servlet changes the session id on login
        _answer(handler, 403, IMPAX_DENIED, cookie=new, max_age=self.cookie_max_age)

    def _open_session(self, user: str) -> str:
        session = secrets.token_hex(16)
        with self._lock:
            self._sessions[session] = 0
            self._opened[session] = time.monotonic()
            self.logins.append(user)
        return session

    def _valid(self, session: str | None) -> bool:
        with self._lock:
            if session is None or session not in self._sessions:
                return False
            self._sessions[session] += 1
            too_old = self.cookie_max_age is not None and (
                time.monotonic() - self._opened[session] > self.cookie_max_age
            )
            used_up = bool(self.session_requests) and (
                self._sessions[session] > self.session_requests
            )
            if too_old or used_up:
                del self._sessions[session]
                self.ended_sessions += 1
                return False
            return True

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        self.seen_headers.append(dict(handler.headers.items()))
        headers = {
            k: v for k, v in handler.headers.items() if k.lower() in ("accept", "accept-encoding")
        }
        try:
            upstream = requests.get(
                self.upstream + handler.path, headers=headers, stream=True, timeout=60
            )
        except requests.RequestException:
            _answer(handler, 502, b"upstream unreachable\n")
            return
        with upstream:
            handler.send_response(upstream.status_code)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    handler.send_header(key, value)
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            for chunk in upstream.raw.stream(1 << 16, decode_content=False):
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            handler.wfile.write(b"0\r\n\r\n")


def _cookie(header: str, name: str) -> str | None:
    """The first value of cookie `name` in a Cookie header: a stale cookie sent before the
    valid one shadows it, as in the servlet containers these products run on."""
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


def _answer(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    *,
    cookie: str | None = None,
    content_type: str = "text/html",
    max_age: int | None = None,
) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    if cookie is not None:
        age = f"; Max-Age={max_age}" if max_age is not None else ""
        handler.send_header("Set-Cookie", f"JSESSIONID={cookie}; Path=/; HttpOnly{age}")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)
