"""`make demo`: start a seeded local Orthanc and run `trolley-etl run manifests/demo.yaml`.

The archive answers HTTP on 127.0.0.1:18042, the address the demo manifest names, to this
machine only, and stops when the run ends. Its DICOM port is off (the demo pulls through
DICOMweb; Orthanc 1.10 cannot bind DICOM to loopback only). A port already in use is refused
before anything starts, so the demo never uploads its data into someone else's server.
Whatever the run exits with, the demo exits with.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

from trolley_etl._harness.dicomgen import standard_cohort
from trolley_etl._harness.orthanc import OrthancError, OrthancServer
from trolley_etl.cli import exit_codes
from trolley_etl.cli.main import main as cli_main

DEMO_HTTP_PORT = 18042
DEMO_DICOM_PORT = 14242


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, default=Path("manifests/demo.yaml"))
    parser.add_argument("run_args", nargs="*", help="more arguments for `trolley-etl run`")
    args = parser.parse_args(argv)

    if port_in_use(DEMO_HTTP_PORT):
        print(
            f"demo: port {DEMO_HTTP_PORT} is already in use by another program; stop it "
            "first (the demo never uploads into a server it did not start)",
            file=sys.stderr,
        )
        return exit_codes.USAGE
    with tempfile.TemporaryDirectory(prefix="trolley-demo-") as workdir:
        server = OrthancServer(
            Path(workdir),
            http_port=DEMO_HTTP_PORT,
            dicom_port=DEMO_DICOM_PORT,
            extra_config={"DicomServerEnabled": False},
        )
        try:
            server.start()
        except OrthancError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return exit_codes.BACKEND_UNAVAILABLE
        with server:
            cohort = standard_cohort()
            server.upload_many(c.data for c in cohort)
            print(
                f"demo archive: Orthanc at {server.url}, {len(cohort)} instances", file=sys.stderr
            )
            code = cli_main(["run", str(args.manifest), *args.run_args])
            if code == exit_codes.OK:
                cli_main(["status", str(args.manifest)])
            return code


def port_in_use(port: int) -> bool:
    """True when something listens on `port` (any interface) or it cannot be bound."""
    for host in ("127.0.0.1", "0.0.0.0"):
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is free
            try:
                probe.bind((host, port))
            except OSError:
                return True
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    raise SystemExit(main())
