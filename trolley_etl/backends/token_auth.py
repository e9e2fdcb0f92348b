"""Bearer tokens that expire: OAuth 2.0 client credentials and credential-helper commands.

A long run outlives its tokens. TokenAuth asks its source for a token before each request,
and the source fetches a new one shortly before the old one expires (a fifth of its lifetime
early, at most 60 s). If the archive still answers 401, the token is dropped and the request
sent once more with a fresh one; a second 401 is the archive's answer. Tokens never appear
in logs, errors or reprs.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

import requests
from requests.auth import AuthBase

from trolley_etl.core.errors import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    ConnectionFailedError,
)

#: Refresh this share of a token's lifetime early, but no more than MAX_EARLY seconds.
EARLY_SHARE = 0.2
MAX_EARLY = 60.0
#: Lifetime assumed for a token that does not say (a helper's plain output, no JWT `exp`).
DEFAULT_LIFETIME = 300.0
#: Bounds on what a token endpoint or a helper may send back, and how long they may take.
MAX_ANSWER = 64 * 1024
TOKEN_TIMEOUT = 30.0
COMMAND_TIMEOUT = 60.0


class TokenSource:
    """Hands out a valid token, fetching a new one when the cached one is about to expire."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = threading.Lock()
        self._clock = clock
        self.fetches = 0

    def token(self) -> str:
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                token, lifetime = self.fetch()
                if not token:
                    raise AuthenticationError(f"{self.describe()} returned an empty token")
                lifetime = lifetime if lifetime and lifetime > 0 else DEFAULT_LIFETIME
                early = min(MAX_EARLY, lifetime * EARLY_SHARE)
                self._token, self._refresh_at = token, self._clock() + lifetime - early
                self.fetches += 1
            return self._token

    def invalidate(self, token: str) -> None:
        """The archive refused `token`: fetch a new one next time (unless that happened)."""
        with self._lock:
            if self._token == token:
                self._token = None

    def fetch(self) -> tuple[str, float | None]:
        """A new token and its lifetime in seconds (None when unknown)."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}(***)"


class OAuth2ClientCredentials(TokenSource):
    """OAuth 2.0 client credentials grant (RFC 6749 4.4), client secret in the body."""

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        scope: str | None = None,
        verify: bool | str = True,
        timeout: float = TOKEN_TIMEOUT,
    ) -> None:
        super().__init__()
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self.scope = scope
        self.verify = verify
        self.timeout = timeout

    def describe(self) -> str:
        return f"the token endpoint {self.token_url}"

    def fetch(self) -> tuple[str, float | None]:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._client_secret,
        }
        if self.scope:
            form["scope"] = self.scope
        try:
            response = requests.post(
                self.token_url,
                data=form,
                timeout=self.timeout,
                verify=self.verify,
                headers={"Accept": "application/json"},
                stream=True,
            )
            with response:
                body = response.raw.read(MAX_ANSWER + 1, decode_content=True)
        except requests.RequestException as exc:
            raise ConnectionFailedError(
                f"cannot reach {self.describe()}: {type(exc).__name__}", url=self.token_url
            ) from None
        if len(body) > MAX_ANSWER:
            raise AuthenticationError(f"{self.describe()} answered more than {MAX_ANSWER} bytes")
        payload = _json_object(body)
        if response.status_code >= 400:
            reason = " - ".join(
                str(payload[k]) for k in ("error", "error_description") if payload.get(k)
            )
            raise AuthenticationError(
                f"{self.describe()} refused the client credentials: HTTP "
                f"{response.status_code} {reason}".rstrip(),
                url=self.token_url,
                status=response.status_code,
            )
        token = payload.get("access_token")
        if not isinstance(token, str):
            raise AuthenticationError(f"{self.describe()} answered without an access_token")
        return token, _number(payload.get("expires_in"))


class CommandToken(TokenSource):
    """The output of a credential helper (e.g. `gcloud auth print-access-token`).

    The helper prints the token, or a JSON object with `access_token` (or `token`) and
    `expires_in`; a JWT's own `exp` claim gives the lifetime of a plain token.
    """

    def __init__(self, command: Sequence[str], *, timeout: float = COMMAND_TIMEOUT) -> None:
        super().__init__()
        if not command:
            raise ConfigurationError("the credential command is empty")
        self.command = list(command)
        self.timeout = timeout

    def describe(self) -> str:
        return f"the credential command {self.command[0]!r}"

    def fetch(self) -> tuple[str, float | None]:
        try:
            done = subprocess.run(
                self.command,
                capture_output=True,
                timeout=self.timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except FileNotFoundError:
            raise BackendError(f"{self.describe()} was not found (is it installed?)") from None
        except subprocess.TimeoutExpired:
            raise AuthenticationError(
                f"{self.describe()} did not finish within {self.timeout:.0f} s"
            ) from None
        if done.returncode != 0:
            tail = " ".join(done.stderr[-300:].decode("utf-8", "replace").split())
            raise AuthenticationError(
                f"{self.describe()} failed with exit code {done.returncode}: {tail}"
            )
        out = done.stdout[:MAX_ANSWER].decode("utf-8", "replace").strip()
        if out.startswith("{"):
            payload = _json_object(out.encode())
            token = payload.get("access_token") or payload.get("token")
            if not isinstance(token, str):
                raise AuthenticationError(f"{self.describe()} printed JSON without access_token")
            return token.strip(), _number(payload.get("expires_in"))
        return out, jwt_lifetime(out)


class TokenAuth(AuthBase):
    """`Authorization: Bearer` with a token from a TokenSource; one retry after a 401."""

    def __init__(self, source: TokenSource) -> None:
        self.source = source

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self.source.token()}"
        request.register_hook("response", self._retry_on_401)  # type: ignore[no-untyped-call]
        return request

    def _retry_on_401(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        request = response.request
        if response.status_code != 401 or getattr(request, "_token_retried", False):
            return response
        used = str(request.headers.get("Authorization", "")).removeprefix("Bearer ")
        self.source.invalidate(used)
        response.content  # noqa: B018 - read the answer so the connection can be reused
        response.close()
        retry = request.copy()
        retry._token_retried = True  # type: ignore[attr-defined]
        retry.headers["Authorization"] = f"Bearer {self.source.token()}"
        again = response.connection.send(retry, **kwargs)
        again.history.append(response)
        again.request = retry
        return again

    def __repr__(self) -> str:
        return f"TokenAuth({self.source!r})"


def jwt_lifetime(token: str, now: float | None = None) -> float | None:
    """Seconds until a JWT's `exp` claim (read, not verified: only to time the refresh)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
        expires = float(claims["exp"])
    except (ValueError, KeyError, TypeError):
        return None
    return expires - (time.time() if now is None else now)


def read_env(name: str) -> str:
    value = os.environ.get(name)
    if value is None:
        raise BackendError(f"environment variable {name} is not set")
    return value


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
