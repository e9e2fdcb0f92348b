"""OAuth 2.0 client credentials and credential-helper tokens, with tokens that expire.

A small token endpoint issues 5-second tokens; a proxy in front of the real Orthanc lets
through only requests that carry an unexpired one (Orthanc itself knows no bearer tokens).
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl

import pytest

from trolley_etl import Query
from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl._harness.proxy import FaultProxy
from trolley_etl.backends import QidoRS
from trolley_etl.backends.token_auth import (
    CommandToken,
    OAuth2ClientCredentials,
    TokenAuth,
    jwt_lifetime,
)
from trolley_etl.cli.main import main
from trolley_etl.core.errors import AuthenticationError

CLIENT_ID, CLIENT_SECRET = "trolley-client", "s3cr3t-of-the-client"


class TokenServer:
    """`POST /token` (client credentials in the body) -> a random token valid `lifetime` s."""

    def __init__(self, lifetime: float = 5.0) -> None:
        self.lifetime = lifetime
        self.issued: dict[str, float] = {}  # token -> monotonic expiry
        self.revoked: set[str] = set()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = min(int(self.headers.get("Content-Length", 0)), 10_000)
                form = dict(parse_qsl(self.rfile.read(length).decode()))
                ok = (
                    form.get("grant_type") == "client_credentials"
                    and form.get("client_id") == CLIENT_ID
                    and form.get("client_secret") == CLIENT_SECRET
                )
                if ok:
                    token = secrets.token_urlsafe(24)
                    with server.lock:
                        server.issued[token] = time.monotonic() + server.lifetime
                    answer = {
                        "access_token": token,
                        "token_type": "Bearer",
                        "expires_in": server.lifetime,
                    }
                    if self.path.endswith("/plain"):
                        body = token.encode()
                    else:
                        body = json.dumps(answer).encode()
                else:
                    body = json.dumps(
                        {"error": "invalid_client", "error_description": "unknown client"}
                    ).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def grants(self) -> int:
        return len(self.issued)

    def accepts(self, headers: Message) -> bool:
        token = str(headers.get("Authorization", "")).removeprefix("Bearer ")
        with self.lock:
            expiry = self.issued.get(token)
            return expiry is not None and time.monotonic() < expiry and token not in self.revoked

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def statuses(proxy: FaultProxy, count: int) -> list[int]:
    """The statuses the proxy answered; it records each once the answer is sent, so wait."""
    deadline = time.monotonic() + 5
    while len(proxy.requests) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return [status for _, status in proxy.requests]


@pytest.fixture
def tokens() -> Iterator[TokenServer]:
    server = TokenServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def gated(orthanc: OrthancServer, tokens: TokenServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(orthanc.url)
    proxy.authorize = tokens.accepts
    try:
        yield proxy
    finally:
        proxy.close()


def test_a_run_outlives_its_five_second_tokens(
    gated: FaultProxy, tokens: TokenServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDP_CLIENT", CLIENT_ID)
    monkeypatch.setenv("IDP_SECRET", CLIENT_SECRET)
    gated.delay = 0.9  # 12 instances one by one: the run lasts more than two token lifetimes
    auth = (
        f"{{type: oauth2, token_url: '{tokens.url}', client_id_env: IDP_CLIENT, "
        "client_secret_env: IDP_SECRET, scope: pacs.read}"
    )
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"""\
version: 1
name: tokens
source:
  search: {{backend: qido-rs, url: "{gated.url}/dicom-web", auth: {auth}}}
  download: {{backend: wado-uri, url: "{gated.url}/wado", auth: {auth}, max_connections: 1}}
queries:
  - name: two
    filters: {{AccessionNumber: [ACC1001, ACC1003]}}
storage:
  root: ./data
run:
  workers: 1
"""
    )
    log = tmp_path / "run.jsonl"
    started = time.monotonic()
    assert main(["run", str(manifest), "--log-format", "json", "--log-file", str(log)]) == 0
    assert time.monotonic() - started > 2 * tokens.lifetime
    stored = list((tmp_path / "data").rglob("*.dcm"))
    expected = sum(COHORT_ACCESSIONS[a].instance_count for a in ("ACC1001", "ACC1003"))
    assert len(stored) == expected
    assert tokens.grants >= 4  # the download's token renewed twice, not only at the start
    text = log.read_text()
    assert CLIENT_SECRET not in text
    assert not any(token in text for token in tokens.issued)


def test_a_refused_token_is_renewed_once(
    gated: FaultProxy, tokens: TokenServer, orthanc: OrthancServer
) -> None:
    source = OAuth2ClientCredentials(tokens.url, CLIENT_ID, CLIENT_SECRET)
    searcher = QidoRS(gated.url + "/dicom-web", auth=TokenAuth(source))
    query = Query(AccessionNumber="ACC1001")
    assert len(searcher.search(query)) == 1
    tokens.revoked.update(tokens.issued)  # the archive stops accepting the current token
    assert len(searcher.search(query)) == 1
    assert tokens.grants == 2 and statuses(gated, 3) == [200, 401, 200]
    gated.authorize = lambda headers: False  # now nothing is accepted: one retry, no loop
    with pytest.raises(AuthenticationError, match="HTTP 401"):
        searcher.search(query)
    time.sleep(0.3)  # a third request would have arrived by now
    assert statuses(gated, 5) == [200, 401, 200, 401, 401]


def test_bad_client_credentials_exit_3(
    gated: FaultProxy, tokens: TokenServer, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("IDP_CLIENT", CLIENT_ID)
    monkeypatch.setenv("IDP_SECRET", "not-the-secret")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"""\
version: 1
name: tokens
source:
  search:
    backend: qido-rs
    url: "{gated.url}/dicom-web"
    auth: {{type: oauth2, token_url: '{tokens.url}', client_id_env: IDP_CLIENT,
            client_secret_env: IDP_SECRET}}
queries:
  - name: one
    filters: {{AccessionNumber: ACC1001}}
storage:
  root: ./data
"""
    )
    assert main(["run", str(manifest), "--log-format", "json"]) == 3
    err = capsys.readouterr().err
    assert "refused the client credentials: HTTP 401 invalid_client - unknown client" in err
    assert "not-the-secret" not in err


HELPER = """
import sys, urllib.request
data = b"grant_type=client_credentials&client_id={id}&client_secret={secret}"
print(urllib.request.urlopen(sys.argv[1], data=data, timeout=10).read().decode())
"""


def test_command_tokens_are_renewed_after_a_401(gated: FaultProxy, tokens: TokenServer) -> None:
    """A helper printing a bare token (lifetime unknown): the 401 after expiry renews it."""
    script = HELPER.format(id=CLIENT_ID, secret=CLIENT_SECRET)
    source = CommandToken([sys.executable, "-c", script, tokens.url + "/plain"])
    searcher = QidoRS(gated.url + "/dicom-web", auth=TokenAuth(source))
    query = Query(AccessionNumber="ACC1001")
    assert len(searcher.search(query)) == 1
    time.sleep(tokens.lifetime + 0.3)
    assert len(searcher.search(query)) == 1
    assert source.fetches == 2 and tokens.grants == 2
    assert statuses(gated, 3) == [200, 401, 200]


@pytest.mark.subprocess
def test_command_output_forms(tmp_path: Path) -> None:
    printed = json.dumps({"access_token": "abc", "expires_in": 42})
    as_json = CommandToken([sys.executable, "-c", f"print({printed!r})"])
    assert as_json.fetch() == ("abc", 42.0)
    failing = CommandToken([sys.executable, "-c", "import sys; sys.exit('no login')"])
    with pytest.raises(AuthenticationError, match="exit code 1: no login"):
        failing.fetch()
    with pytest.raises(Exception, match="was not found"):
        CommandToken([str(tmp_path / "no-such-helper")]).fetch()
    assert repr(TokenAuth(as_json)) == "TokenAuth(CommandToken(***))"


def test_jwt_expiry_times_the_refresh() -> None:
    import base64

    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1000}).encode()).rstrip(b"=").decode()
    assert jwt_lifetime(f"e30.{claims}.sig", now=940) == 60
    assert jwt_lifetime("not-a-jwt") is None


def test_a_token_endpoint_needs_https_beyond_loopback(tmp_path: Path) -> None:
    from trolley_etl.core.errors import ManifestError
    from trolley_etl.manifest import load_manifest

    path = tmp_path / "m.yaml"
    path.write_text(
        """\
version: 1
name: tokens
source:
  search:
    backend: qido-rs
    url: https://pacs.example.org/dicom-web
    auth: {type: oauth2, token_url: "http://idp.example.org/token", client_id_env: A,
           client_secret_env: B}
queries:
  - name: one
    filters: {AccessionNumber: ACC1001}
storage:
  root: ./data
"""
    )
    with pytest.raises(ManifestError, match="unencrypted: use https"):
        load_manifest(path, check_env=False)
