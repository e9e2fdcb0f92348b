"""A small HTTP proxy in front of a real archive, for failure tests.

It forwards GET requests to the upstream server, streaming the answer, and can be told to
answer some requests itself first (503 with Retry-After, 502 when the upstream is down), to
slow every answer down, or to drop the last part of every multipart answer (a well-formed
answer with one instance fewer: the silent loss that completeness checks exist for), so
that retries, backoff, interruption and completeness can be tested against a real Orthanc.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "content-length",
}


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.delay = 0.0  # seconds before each answer
        self.failures: list[tuple[int, dict[str, str]]] = []  # answered instead of forwarding
        self.fail_prefix = ""  # only requests whose path starts with this fail
        self.requests: list[tuple[str, int]] = []  # (path, status) of every answer
        self.drop_one_part = False  # drop the last part of each multipart/related answer
        self.drop_prefix = ""  # only answers to paths starting with this lose a part
        self.dropped: list[str] = []  # paths whose answer lost a part
        self.started: list[float] = []  # monotonic time each request arrived
        #: when set, requests whose headers it refuses are answered 401 (a token-checking archive)
        self.authorize: Callable[[Message], bool] | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                proxy._handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail_next(
        self, count: int, status: int, headers: dict[str, str] | None = None, prefix: str = ""
    ) -> None:
        with self._lock:
            self.failures = [(status, dict(headers or {}))] * count
            self.fail_prefix = prefix

    def _take_failure(self, path: str) -> tuple[int, dict[str, str]] | None:
        with self._lock:
            if self.failures and path.startswith(self.fail_prefix):
                return self.failures.pop(0)
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.started.append(time.monotonic())
        if self.authorize is not None and not self.authorize(handler.headers):
            self._answer(handler, 401, {"WWW-Authenticate": "Bearer"}, b"token refused\n")
            return
        if self.delay:
            time.sleep(self.delay)
        failure = self._take_failure(handler.path)
        if failure is not None:
            self._answer(handler, failure[0], failure[1], b"injected failure\n")
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host",)}
        try:
            upstream = requests.get(
                self.upstream + handler.path, headers=headers, stream=True, timeout=60
            )
        except requests.RequestException:
            self._answer(handler, 502, {}, b"upstream unreachable\n")
            return
        with upstream:
            content_type = upstream.headers.get("Content-Type", "")
            if (
                self.drop_one_part
                and handler.path.startswith(self.drop_prefix)
                and upstream.status_code == 200
                and "multipart" in content_type
            ):
                self._answer(
                    handler,
                    200,
                    {"Content-Type": content_type},
                    self._without_last_part(upstream.content, content_type),
                )
                self.dropped.append(handler.path)
                return
            body = upstream.raw.read(decode_content=False) if upstream.status_code >= 400 else None
            handler.send_response(upstream.status_code)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    handler.send_header(key, value)
            if body is not None:
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)
            else:
                handler.send_header("Transfer-Encoding", "chunked")
                handler.end_headers()
                for chunk in upstream.raw.stream(1 << 16, decode_content=False):
                    handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                handler.wfile.write(b"0\r\n\r\n")
        self.requests.append((handler.path, upstream.status_code))

    @staticmethod
    def _without_last_part(body: bytes, content_type: str) -> bytes:
        """The same multipart body, well formed, with its last part left out."""
        boundary = next(
            p.split("=", 1)[1].strip().strip('"')
            for p in content_type.split(";")
            if p.strip().lower().startswith("boundary=")
        )
        delimiter = b"--" + boundary.encode()
        pieces = body.split(delimiter)  # preamble, parts..., "--" epilogue
        if len(pieces) < 4:  # fewer than two parts: keep the answer as it is
            return body
        return delimiter.join([*pieces[:-2], pieces[-1]])

    def _answer(
        self, handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes
    ) -> None:
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        self.requests.append((handler.path, status))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class CountingTcpProxy:
    """Forwards TCP connections to an upstream port and times them (HTTP or DICOM alike).

    `spans` holds each connection's [accepted, client closed] monotonic times, so tests can
    measure how many were open at once and how fast they were opened.
    """

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.spans: list[list[float]] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def opened(self) -> list[float]:
        """When each connection was accepted, in order."""
        with self._lock:
            return sorted(span[0] for span in self.spans)

    def max_open(self, grace: float = 0.0) -> int:
        """The most connections open at one moment; each is counted `grace` s shorter, for
        the moment between a client's close and the proxy noticing it."""
        with self._lock:
            edges = [(start, 1) for start, _ in self.spans]
            edges += [(max(start, end - grace), -1) for start, end in self.spans]
        most = current = 0
        for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):
            current += step
            most = max(most, current)
        return most

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            span = [time.monotonic(), float("inf")]
            with self._lock:
                self.spans.append(span)
            threading.Thread(target=self._serve, args=(client, span), daemon=True).start()

    def _serve(self, client: socket.socket, span: list[float]) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            span[1] = time.monotonic()
            return
        upstream.settimeout(None)
        back = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
        back.start()
        self._pump(client, upstream)
        span[1] = time.monotonic()  # the client closed its side
        back.join(timeout=60)
        for sock in (client, upstream):
            sock.close()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)
