"""`make demo`: start a local Orthanc, seed it, and pull an extraction through the Trolley.

This shows the whole path on real parts: QIDO-RS search, WADO-RS download, atomic storage in
the UID layout. It runs until the manifest runner takes over the demo.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from trolley_etl import Query, StorageDir, Trolley
from trolley_etl.backends import QidoRS, WadoRS
from trolley_etl.core.errors import TrolleyError
from trolley_etl.testing.dicomgen import standard_cohort
from trolley_etl.testing.orthanc import OrthancError, OrthancServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo-data", help="where to store the extraction")
    args = parser.parse_args(argv)
    output = Path(args.output).absolute()

    with tempfile.TemporaryDirectory(prefix="trolley-demo-") as workdir:
        try:
            server = OrthancServer(Path(workdir)).start()
        except OrthancError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 3
        with server:
            cohort = standard_cohort()
            server.upload_many(c.data for c in cohort)
            print(f"archive: Orthanc at {server.url} seeded with {len(cohort)} instances")

            trolley = Trolley(
                searcher=QidoRS(server.dicomweb_url),
                downloader=WadoRS(server.dicomweb_url),
                storage=StorageDir(output),
            )
            query = Query(StudyDate="20240101-20241231", ModalitiesInStudy="CT")
            try:
                studies = trolley.find_studies(query)
                print(f"search: {len(studies)} CT studies from 2024")
                started = time.monotonic()
                stored = trolley.download(studies)
            except TrolleyError as exc:
                print(f"demo: {exc}", file=sys.stderr)
                return 1
            seconds = time.monotonic() - started
            size = sum(s.size for s in stored)
            print(f"download: {len(stored)} instances, {size / 1024:.0f} KiB in {seconds:.2f} s")
            for study in studies:
                mine = [s for s in stored if s.study_uid == study.uid]
                print(
                    f"  {study.data.get('AccessionNumber', '')!s:12} {len(mine):3} files  "
                    f"{study.uid}"
                )
            print(f"stored under {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
