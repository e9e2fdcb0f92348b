"""stunnel in front of a loopback server: HTTPS (optionally mutual TLS) for tests and demos.

Orthanc 1.10 as packaged by Debian 12 crashes on its first HTTPS connection, so the test
archive's HTTPS comes from stunnel (`apt-get install stunnel4`), a real TLS terminator, in
front of its plain HTTP port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from trolley_etl._harness.orthanc import free_port, terminate

_START_TIMEOUT = 15.0


class TlsFrontError(RuntimeError):
    """stunnel is missing or did not start."""


class TlsFront:
    """`https://127.0.0.1:{port}` forwarding to `127.0.0.1:{upstream_port}`.

    `client_ca` makes the front require a client certificate signed by that CA.
    """

    def __init__(
        self,
        workdir: Path,
        upstream_port: int,
        *,
        cert: Path,
        key: Path,
        client_ca: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.upstream_port = upstream_port
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> TlsFront:
        binary = shutil.which("stunnel4") or shutil.which("stunnel")
        if binary is None:
            raise TlsFrontError("stunnel not found; run `apt-get install stunnel4`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        lines = [
            "foreground = yes",
            "pid =",
            f"output = {self.workdir / 'stunnel.log'}",
            "[front]",
            f"accept = 127.0.0.1:{self.port}",
            f"connect = 127.0.0.1:{self.upstream_port}",
            f"cert = {self.cert}",
            f"key = {self.key}",
        ]
        if self.client_ca is not None:
            lines += [f"CAfile = {self.client_ca}", "verifyChain = yes", "requireCert = yes"]
        config = self.workdir / "stunnel.conf"
        config.write_text("\n".join(lines) + "\n")
        self._proc = subprocess.Popen(
            [binary, str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        log = self.workdir / "stunnel.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
        raise TlsFrontError(f"stunnel did not start; log tail:\n{tail}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc)

    def __enter__(self) -> TlsFront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
