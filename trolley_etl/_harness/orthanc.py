"""Start and drive a throw-away Orthanc server for tests and demos.

The server listens on loopback only (``RemoteAccessAllowed: false``; Orthanc 1.10 has no
bind-address option, so the DICOM port is technically reachable on every interface of the
host, but it is picked at random and lives only as long as the test session).

Example::

    with OrthancServer(tmp_path) as srv:
        srv.upload(Path("ct.dcm"))
        requests.get(srv.dicomweb_url + "/studies")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

__all__ = [
    "DICOMWEB_PLUGIN",
    "OrthancError",
    "OrthancNotInstalledError",
    "OrthancServer",
    "OrthancStartError",
    "find_orthanc_binary",
    "free_port",
]

#: Standard Debian install path of the DICOMweb plugin (package ``orthanc-dicomweb``).
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
_DEBIAN_BINARY = Path("/usr/sbin/Orthanc")
_INSTALL_HINT = "run `apt-get install orthanc orthanc-dicomweb`"
_START_TIMEOUT = 30.0
# Orthanc 1.10 logs "The TCP port of the HTTP/DICOM server is privileged or already in use".
_PORT_TAKEN_MARKERS = ("already in use",)


class OrthancError(RuntimeError):
    """Base class of the harness errors."""


class OrthancNotInstalledError(OrthancError):
    """The Orthanc binary or its DICOMweb plugin is not installed."""


class OrthancStartError(OrthancError):
    """Orthanc did not come up; the message ends with the tail of its log."""


def terminate(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, wait up to 10 s, then SIGKILL; nothing for a process already gone."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Also handy to get an address where nothing listens ("unreachable server" tests).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_orthanc_binary() -> Path:
    """Locate the Orthanc executable or raise :class:`OrthancNotInstalledError`."""
    found = shutil.which("Orthanc")
    if found:
        return Path(found)
    if _DEBIAN_BINARY.is_file() and os.access(_DEBIAN_BINARY, os.X_OK):
        return _DEBIAN_BINARY
    raise OrthancNotInstalledError(f"Orthanc executable not found; {_INSTALL_HINT}")


def _answered_by(response: requests.Response, name: str) -> bool:
    """Is this `GET /system` answer from our Orthanc (its Name), not one already running?"""
    try:
        return bool(response.json().get("Name") == name)
    except (ValueError, AttributeError):
        return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class OrthancServer:
    """A private Orthanc process with the DICOMweb plugin, configured for tests."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        aet: str = "ORTHANC",
        check_called_aet: bool = False,
        modalities: dict[str, list[Any]] | None = None,
        extra_config: dict[str, Any] | None = None,
        http_port: int = 0,
        dicom_port: int = 0,
    ) -> None:
        """`http_port`/`dicom_port` 0 means a free port picked at each start."""
        self.workdir = Path(workdir)
        self._wanted_ports = (http_port, dicom_port)
        self.users = dict(users) if users else None
        self.aet = aet
        self.check_called_aet = check_called_aet
        self.modalities = {k: list(v) for k, v in (modalities or {}).items()}
        self.extra_config = dict(extra_config or {})
        self.http_port = 0
        self.dicom_port = 0
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._local = threading.local()

    # ------------------------------------------------------------------ urls
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return self.url + "/dicom-web"

    @property
    def wado_uri_url(self) -> str:
        return self.url + "/wado"

    @property
    def auth(self) -> tuple[str, str] | None:
        """Credentials of the first registered user (for ``requests``), or None."""
        if not self.users:
            return None
        user, password = next(iter(self.users.items()))
        return (user, password)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------- lifecycle
    def config(self) -> dict[str, Any]:
        """The configuration written to ``orthanc.json`` (with the current ports)."""
        cfg: dict[str, Any] = {
            "Name": f"trolley-test-{self.aet}",
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
            "DicomAet": self.aet,
            "DicomCheckCalledAet": self.check_called_aet,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": self.modalities,
            "StorageCompression": False,
            "OverwriteInstances": False,
            "HttpCompressionEnabled": False,
            "ConcurrentJobs": 2,
            "SaveJobs": False,
            "AuthenticationEnabled": bool(self.users),
        }
        if self.users:
            cfg["RegisteredUsers"] = dict(self.users)
        cfg.update(self.extra_config)
        return cfg

    def start(self) -> OrthancServer:
        """Start the process and wait (<= 30 s) until ``GET /system`` answers."""
        if self.running:
            return self
        binary = find_orthanc_binary()
        if not DICOMWEB_PLUGIN.is_file():
            raise OrthancNotInstalledError(
                f"DICOMweb plugin {DICOMWEB_PLUGIN} not found; {_INSTALL_HINT}"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_once(binary)
        except OrthancStartError as exc:
            log = _tail(self.log_path).lower()
            if not any(marker in log for marker in _PORT_TAKEN_MARKERS):
                raise
            # A port was grabbed by someone else between free_port() and bind(): retry once,
            # keeping the failed attempt's log next to the new one.
            self._kill()
            with contextlib.suppress(OSError):
                self.log_path.replace(self.log_path.with_suffix(".log.1"))
            self._start_once(binary, previous=exc)
        return self

    def _start_once(self, binary: Path, previous: Exception | None = None) -> None:
        self.http_port = self._wanted_ports[0] or free_port()
        self.dicom_port = self._wanted_ports[1] or free_port()
        for _ in range(10):
            if self.dicom_port != self.http_port:
                break
            self.dicom_port = free_port()
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [str(binary), str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        last_error: str = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                last_error = f"Orthanc exited with code {self._proc.returncode}"
                break
            try:
                resp = requests.get(self.url + "/system", auth=self.auth, timeout=2)
                if resp.status_code == 200 and _answered_by(resp, self.config()["Name"]):
                    return
                if resp.status_code == 200:  # someone else's server holds the port
                    last_error = f"another server already answers on port {self.http_port}"
                    break
                last_error = f"GET /system answered {resp.status_code}"
            except requests.RequestException as exc:
                last_error = str(exc)
            time.sleep(0.1)
        else:
            last_error = last_error or "timeout"
            last_error = f"Orthanc did not answer within {_START_TIMEOUT:.0f} s ({last_error})"
        self._kill()
        raise OrthancStartError(
            f"{last_error}; config {self.config_path}; log tail:\n{_tail(self.log_path)}"
        ) from previous

    def restart(self) -> OrthancServer:
        """Stop and start again on the same ports, with the same stored data."""
        self.stop()
        self._wanted_ports = (self.http_port, self.dicom_port)
        return self.start()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        terminate(proc)

    def stop(self) -> None:
        """SIGTERM, wait up to 10 s, then SIGKILL. Safe to call more than once."""
        self._kill()

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<OrthancServer {self.aet} {self.url} dicom={self.dicom_port} {state}>"

    # --------------------------------------------------------------- helpers
    def _session(self) -> requests.Session:
        sess = getattr(self._local, "session", None)
        if sess is None:
            sess = requests.Session()
            sess.auth = self.auth
            self._local.session = sess
        return sess

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """HTTP request to the server (``path`` relative to :attr:`url`), with credentials."""
        kwargs.setdefault("timeout", 60)
        return self._session().request(method, self.url + path, **kwargs)

    def upload(self, data: bytes | Path) -> str:
        """Store one DICOM Part 10 file (``POST /instances``); return the Orthanc ID."""
        payload = Path(data).read_bytes() if isinstance(data, (str, os.PathLike)) else data
        for attempt in range(3):  # storing twice is harmless ("AlreadyStored")
            try:
                resp = self.request(
                    "POST",
                    "/instances",
                    data=payload,
                    headers={"Content-Type": "application/dicom"},
                )
                break
            except requests.ConnectionError:
                # a kept-alive connection the server closed as it was reused: a new one
                if attempt == 2:
                    raise
        resp.raise_for_status()
        body = resp.json()
        if body.get("Status") not in ("Success", "AlreadyStored"):
            raise OrthancError(f"upload refused: {body}")
        return str(body["ID"])

    def upload_many(self, items: Iterable[bytes | Path], workers: int = 4) -> list[str]:
        """Upload concurrently (one ``requests.Session`` per worker); IDs in input order."""
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(self.upload, items))

    def find_instance_id(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Orthanc ID of an instance given its three UIDs (``POST /tools/find``)."""
        resp = self.request(
            "POST",
            "/tools/find",
            json={
                "Level": "Instance",
                "Query": {
                    "StudyInstanceUID": study_uid,
                    "SeriesInstanceUID": series_uid,
                    "SOPInstanceUID": sop_uid,
                },
            },
        )
        resp.raise_for_status()
        ids = resp.json()
        if len(ids) != 1:
            raise OrthancError(f"expected one instance {sop_uid}, Orthanc found {ids}")
        return str(ids[0])

    def instance_file(self, study_uid: str, series_uid: str, sop_uid: str) -> bytes:
        """Exact bytes Orthanc stored for an instance (``GET /instances/{id}/file``)."""
        oid = self.find_instance_id(study_uid, series_uid, sop_uid)
        resp = self.request("GET", f"/instances/{oid}/file")
        resp.raise_for_status()
        return resp.content

    def statistics(self) -> dict[str, Any]:
        """``GET /statistics`` (CountPatients, CountStudies, CountInstances, ...)."""
        resp = self.request("GET", "/statistics")
        resp.raise_for_status()
        return dict(resp.json())

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a DICOM peer (``PUT /modalities/NAME``), e.g. a C-MOVE destination."""
        resp = self.request(
            "PUT", f"/modalities/{name}", json={"AET": aet, "Host": host, "Port": int(port)}
        )
        resp.raise_for_status()
        self.modalities[name] = [aet, host, int(port)]

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._kill()
