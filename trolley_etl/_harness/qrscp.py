"""Start and drive pynetdicom's own Query/Retrieve SCP (`python -m pynetdicom qrscp`) for tests.

A second, independent DIMSE implementation next to Orthanc: it proves the C-FIND, C-GET and
C-MOVE backends against another archive's reading of the standard. It needs sqlalchemy.

Its move destinations come from its configuration file only, so they are given when the
server is built. Example::

    with QRSCPServer(tmp_path, destinations={"TROLLEY": ("127.0.0.1", 11113)}) as qr:
        qr.store(inst.data for inst in standard_cohort())
"""

from __future__ import annotations

import configparser
import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pydicom
from pynetdicom import AE

from trolley_etl._harness.orthanc import free_port, terminate
from trolley_etl.backends.dimse import VERIFICATION

__all__ = ["QRSCPError", "QRSCPServer"]

_START_TIMEOUT = 30.0


class QRSCPError(RuntimeError):
    """qrscp did not start or refused an object; the message ends with its log."""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class QRSCPServer:
    """A private qrscp process on a free loopback port, its database in `workdir`."""

    def __init__(
        self,
        workdir: Path,
        *,
        aet: str = "QRSCP",
        destinations: dict[str, tuple[str, int]] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.destinations = dict(destinations or {})
        self.timeout = timeout
        self.host = "127.0.0.1"
        self.port = 0
        self.config_path = self.workdir / "qrscp.ini"
        self.log_path = self.workdir / "qrscp.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> configparser.ConfigParser:
        cfg = configparser.ConfigParser()
        cfg["DEFAULT"] = {
            "ae_title": self.aet,
            "port": str(self.port),
            "max_pdu": "16382",
            "acse_timeout": str(self.timeout),
            "dimse_timeout": str(self.timeout),
            "network_timeout": str(self.timeout),
            "bind_address": self.host,
            # absolute paths: qrscp joins relative ones to its own package folder
            "instance_location": str(self.workdir / "instances"),
            "database_location": str(self.workdir / "instances.sqlite"),
            "log_identifier": "False",
        }
        for aet, (host, port) in self.destinations.items():
            cfg[aet] = {"address": host, "port": str(port)}
        return cfg

    def start(self) -> QRSCPServer:
        """Start qrscp and wait (<= 30 s) until it answers C-ECHO."""
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        with open(self.config_path, "w") as handle:
            self.config().write(handle)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pynetdicom", "qrscp", "-c", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if self.echo():
                return self
            time.sleep(0.1)
        code = self._proc.poll()
        self.stop()
        state = f"exited with code {code}" if code is not None else "did not answer C-ECHO"
        raise QRSCPError(
            f"qrscp {state} (is sqlalchemy installed?); log tail:\n{_tail(self.log_path)}"
        )

    def _ae(self) -> AE:
        ae = AE(ae_title="SEEDER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        return ae

    def echo(self) -> bool:
        """True when qrscp answers a C-ECHO."""
        ae = self._ae()
        ae.add_requested_context(VERIFICATION)
        assoc = ae.associate(self.host, self.port, ae_title=self.aet)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and int(status.Status) == 0
        finally:
            assoc.release()

    def store(self, items: Iterable[bytes]) -> int:
        """C-STORE Part 10 files (bytes) on one association; return how many were stored."""
        datasets = [pydicom.dcmread(io.BytesIO(data)) for data in items]
        ae = self._ae()
        pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
        for sop_class, syntax in sorted(pairs):  # sent as stored: one context per syntax
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(self.host, self.port, ae_title=self.aet)
        if not assoc.is_established:
            raise QRSCPError(f"qrscp refused the seeding association; log:\n{_tail(self.log_path)}")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if not status or int(status.Status) != 0:
                    raise QRSCPError(f"qrscp refused {ds.SOPInstanceUID}: {status}")
        finally:
            assoc.release()
        return len(datasets)

    def stop(self) -> None:
        """SIGTERM, wait up to 10 s, then SIGKILL. Safe to call more than once."""
        proc, self._proc = self._proc, None
        terminate(proc)

    def __enter__(self) -> QRSCPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
