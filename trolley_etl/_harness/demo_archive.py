"""`make demo-archive`: the seeded demo archive, kept running until Ctrl-C.

`make demo` starts the archive, pulls and stops it. To try the other commands by hand
(`plan`, `lock`, `run`, `status`, `report`, `doctor`) against the addresses the demo manifest
names, keep it running with this in one terminal and use a second one. Ctrl-C (or SIGTERM)
stops Orthanc and removes its temporary storage.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from trolley_etl._harness.demo import DEMO_DICOM_PORT, DEMO_HTTP_PORT
from trolley_etl._harness.dicomgen import standard_cohort
from trolley_etl._harness.orthanc import OrthancError, OrthancServer
from trolley_etl.cli import exit_codes

TRY = """\
Try, in another terminal (with trolley-etl on the PATH: . .venv/bin/activate):
  trolley-etl plan {manifest}
  trolley-etl lock {manifest}
  trolley-etl run {manifest}
  trolley-etl status {manifest}
  trolley-etl doctor {manifest}
  trolley-etl report {manifest} --format html --output demo-report.html
Ctrl-C here stops the archive.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, default=Path("manifests/demo.yaml"))
    parser.add_argument("--http-port", type=int, default=DEMO_HTTP_PORT)
    parser.add_argument("--dicom-port", type=int, default=DEMO_DICOM_PORT)
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with tempfile.TemporaryDirectory(prefix="trolley-demo-archive-") as workdir:
        server = OrthancServer(Path(workdir), http_port=args.http_port, dicom_port=args.dicom_port)
        try:
            server.start()
        except OrthancError as exc:
            print(f"demo-archive: {exc}", file=sys.stderr)
            return exit_codes.BACKEND_UNAVAILABLE
        with server:
            cohort = standard_cohort()
            server.upload_many(c.data for c in cohort)
            print(
                f"demo archive running: Orthanc at {server.url} (DICOM port "
                f"{args.dicom_port}), {len(cohort)} instances",
                flush=True,
            )
            print(TRY.format(manifest=args.manifest), flush=True)
            while not stop.wait(1.0):
                if not server.running:
                    print("demo-archive: Orthanc stopped on its own", file=sys.stderr)
                    return exit_codes.BACKEND_UNAVAILABLE
        print("demo archive stopped", flush=True)
    return exit_codes.OK


if __name__ == "__main__":
    raise SystemExit(main())
