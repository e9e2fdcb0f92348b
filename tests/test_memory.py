"""A study far larger than memory should need: WADO-RS download keeps a flat memory profile."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import large_series_instances
from trolley_etl._harness.orthanc import OrthancServer

STUDY_BYTES = 256 * 1024 * 1024

# VmHWM is the peak RSS of this process image; ru_maxrss would include the parent's peak,
# which a forked child inherits.
DOWNLOAD_SCRIPT = """
import json, re, sys
from trolley_etl import Trolley, StudyReference
from trolley_etl.backends import WadoRS
def peak_kb():
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1))
url, study_uid, out = sys.argv[1:4]
baseline = peak_kb()
stored = Trolley(downloader=WadoRS(url), workers=1).download(StudyReference(study_uid), out)
print(json.dumps({"baseline_kb": baseline, "peak_kb": peak_kb(), "files": len(stored),
                  "bytes": sum(s.size for s in stored)}))
"""


@pytest.fixture(scope="module")
def large_study(tmp_path_factory) -> Iterator[tuple[OrthancServer, str, int, int]]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-large")).start()
    try:
        total, count, study_uid = 0, 0, ""
        for instance in large_series_instances(STUDY_BYTES):
            server.upload(instance.data)
            total += instance.size
            count += 1
            study_uid = instance.study_uid
        yield server, study_uid, count, total
    finally:
        server.stop()


def test_large_study_download_memory_stays_flat(large_study, tmp_path: Path) -> None:
    server, study_uid, count, total = large_study
    assert total > 200 * 1024 * 1024
    result = subprocess.run(
        [sys.executable, "-c", DOWNLOAD_SCRIPT, server.dicomweb_url, study_uid, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["files"] == count
    assert figures["bytes"] == total
    peak_bytes = figures["peak_kb"] * 1024
    grown = (figures["peak_kb"] - figures["baseline_kb"]) * 1024
    print(
        f"study {total / 2**20:.0f} MiB, peak RSS {peak_bytes / 2**20:.0f} MiB, "
        f"growth during download {grown / 2**20:.0f} MiB"
    )
    assert peak_bytes < total / 3, "peak memory must stay far below the study size"
    assert grown < 48 * 1024 * 1024, "memory must not grow with the study"
