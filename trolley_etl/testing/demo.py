"""`make demo`: start a seeded local Orthanc and run `trolley-etl run manifests/demo.yaml`.

The archive listens on 127.0.0.1:18042 (HTTP) and 14242 (DICOM), the addresses the demo
manifest names, and stops when the run ends. Whatever the run exits with, the demo exits with.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from trolley_etl.cli import exit_codes
from trolley_etl.cli.main import main as cli_main
from trolley_etl.testing.dicomgen import standard_cohort
from trolley_etl.testing.orthanc import OrthancError, OrthancServer

DEMO_HTTP_PORT = 18042
DEMO_DICOM_PORT = 14242


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, default=Path("manifests/demo.yaml"))
    parser.add_argument("run_args", nargs="*", help="more arguments for `trolley-etl run`")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="trolley-demo-") as workdir:
        server = OrthancServer(Path(workdir), http_port=DEMO_HTTP_PORT, dicom_port=DEMO_DICOM_PORT)
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


if __name__ == "__main__":
    raise SystemExit(main())
