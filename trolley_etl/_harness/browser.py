"""Headless Chromium (from the distribution) driven over the DevTools protocol, for tests.

The protocol runs over a pipe (`--remote-debugging-pipe`: commands on fd 3, answers on fd 4,
each a JSON message ending in a NUL byte), so no port is opened and no extra library is
needed. A fresh profile folder, no network services, no sandbox (tests run as root).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--remote-debugging-pipe",
)


class BrowserError(RuntimeError):
    """Chromium is missing, died, or did not answer in time."""


def find_chromium() -> str | None:
    return next((p for name in CANDIDATES if (p := shutil.which(name))), None)


def _as_fds_3_and_4(reader: int, writer: int) -> None:
    """In the child: the pipe ends become fds 3 and 4 (via fds above 9, so neither end is
    overwritten when one of them already is 3 or 4)."""
    high_reader = fcntl.fcntl(reader, fcntl.F_DUPFD, 10)
    high_writer = fcntl.fcntl(writer, fcntl.F_DUPFD, 10)
    os.dup2(high_reader, 3)
    os.dup2(high_writer, 4)


class Page:
    """One page in a headless Chromium; collects console messages and uncaught errors."""

    def __init__(self, timeout: float = 30.0) -> None:
        binary = find_chromium()
        if binary is None:
            raise BrowserError("chromium is not installed: apt-get install -y chromium")
        self.timeout = timeout
        self.console: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self._profile = tempfile.mkdtemp(prefix="trolley-chromium-")
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # the child's fd 3 reads our commands, its fd 4 writes the answers
        self._proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=lambda: _as_fds_3_and_4(to_browser, from_browser),
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None
        try:
            targets = self.send("Target.getTargets")["targetInfos"]
            page = next(t for t in targets if t["type"] == "page")
            attached = self.send("Target.attachToTarget", targetId=page["targetId"], flatten=True)
            self._session = attached["sessionId"]
            self.send("Runtime.enable")
            self.send("Page.enable")
        except BaseException:
            self.close()
            raise

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if self._session and not method.startswith("Target."):
            message["sessionId"] = self._session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        answer = self._wait(lambda m: m.get("id") == message["id"])
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error']}")
        return dict(answer.get("result", {}))

    def _wait(self, wanted: Any) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                self._note(message)
                if wanted(message):
                    return dict(message)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("chromium did not answer in time")
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                chunk = os.read(self._read, 1 << 16)
                if not chunk:
                    raise BrowserError("chromium closed the pipe (it crashed or exited)")
                self._buffer += chunk

    def _note(self, message: dict[str, Any]) -> None:
        method = message.get("method")
        if method == "Runtime.consoleAPICalled":
            self.console.append(message["params"])
        elif method == "Runtime.exceptionThrown":
            self.errors.append(message["params"]["exceptionDetails"])
        elif method == "Log.entryAdded" and message["params"]["entry"]["level"] == "error":
            self.errors.append(message["params"]["entry"])

    def open(self, path: Path) -> None:
        """Load a local file and wait for its load event."""
        self.send("Log.enable")
        self.send("Page.navigate", url=path.absolute().as_uri())
        self._wait(lambda m: m.get("method") == "Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        for fd in (self._write, self._read):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
