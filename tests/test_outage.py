"""Searches retry, an unreachable archive is exit 3, and an outage is waited out (issue 13).

Against a real Orthanc behind the FaultProxy (which answers 503 on demand, and 502 while the
archive behind it is stopped, as a hospital's reverse proxy does during a PACS restart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, standard_cohort
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl._harness.proxy import FaultProxy
from trolley_etl.core.outage import OutageGate

ACCESSIONS = ("ACC1001", "ACC1003", "ACC1004")
STUDY_UIDS = {COHORT_ACCESSIONS[a].study_uid for a in ACCESSIONS}


@pytest.fixture(scope="module")
def instances() -> list:
    return [c for c in standard_cohort() if c.study_uid in STUDY_UIDS]


@pytest.fixture(scope="module")
def archive(tmp_path_factory, instances) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-outage")).start()
    try:
        server.upload_many(c.data for c in instances)
        yield server
    finally:
        server.stop()


def write_manifest(folder: Path, url: str, run: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cohort.csv").write_text("AccessionNumber\n" + "\n".join(ACCESSIONS) + "\n")
    path = folder / "pull.yaml"
    path.write_text(
        f"""\
version: 1
name: outage-test
source:
  search: {{backend: qido-rs, url: "{url}/dicom-web"}}
queries:
  - name: cohort
    from_csv: {{path: cohort.csv, column: AccessionNumber}}
storage:
  root: ./data
run:
{run}"""
    )
    return path


def trolley(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args, "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def stored(root: Path) -> int:
    return sum(1 for p in root.rglob("*.dcm") if ".trolley" not in p.parts)


def test_search_503_with_retry_after_is_retried(archive, instances, tmp_path) -> None:
    proxy = FaultProxy(archive.url)
    try:
        proxy.fail_next(2, 503, {"Retry-After": "1"}, prefix="/dicom-web/studies?")
        manifest = write_manifest(tmp_path, proxy.url, "  workers: 1\n  retries: 3\n")
        started = time.monotonic()
        result = trolley("run", str(manifest))
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started >= 2  # both Retry-After waits were honoured
        assert [s for p, s in proxy.requests if p.startswith("/dicom-web/studies?")][:3] == [
            503,
            503,
            200,
        ]
        assert stored(tmp_path / "data") == len(instances)
    finally:
        proxy.close()


def test_search_against_an_archive_that_stays_down_exits_3(archive, tmp_path) -> None:
    proxy = FaultProxy(archive.url)
    try:
        proxy.fail_next(100, 503, {"Retry-After": "0"})
        manifest = write_manifest(tmp_path, proxy.url, "  retries: 2\n")
        result = trolley("run", str(manifest))
        assert result.returncode == 3, result.stderr
        assert "Traceback" not in result.stderr
        failed = [e for e in events(result.stderr) if e["event"] == "run.failed"]
        assert failed and "stayed unavailable through 3 attempt(s)" in failed[0]["error"]
        assert [s for _, s in proxy.requests] == [503, 503, 503]
    finally:
        proxy.close()


@pytest.mark.archive
def test_a_pacs_restart_mid_run_is_waited_out(tmp_path, instances) -> None:
    server = OrthancServer(tmp_path / "orthanc").start()
    proxy = FaultProxy(server.url)
    try:
        server.upload_many(c.data for c in instances)
        proxy.delay = 0.3
        manifest = write_manifest(
            tmp_path / "pull", proxy.url, "  workers: 1\n  retries: 1\n  outage_wait: 90\n"
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "trolley_etl", "run", str(manifest), "--log-format", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        seen = []
        for line in process.stderr:
            seen.append(line)
            if '"event": "item.done"' in line:
                server.stop()  # every request now gets 502 from the proxy
                threading.Timer(4, server.restart).start()
                break
        _, rest = process.communicate(timeout=120)
        log = "".join(seen) + rest
        assert process.returncode == 0, log
        assert not [e for e in events(rest) if e["event"] == "item.failed"]
        assert 502 in [status for _, status in proxy.requests]
        assert stored(tmp_path / "pull" / "data") == len(instances)
    finally:
        proxy.close()
        server.stop()


# --- the gate's decisions, in-process ----------------------------------------------------------


def test_gate_never_waits_before_the_archive_answered_once() -> None:
    gate = OutageGate(60)
    assert not gate.should_retry(lambda: False, 1, status=503)


def test_gate_leaves_a_single_failing_request_to_the_normal_retries() -> None:
    gate = OutageGate(60)
    gate.answered()
    assert not gate.should_retry(lambda: True, 1, status=503)  # the probe answers: no outage
    assert not gate.in_outage
    assert not gate.should_retry(lambda: False, 1, status=404)  # not an outage kind of error


def test_gate_waits_during_an_outage_and_gives_up_after_outage_wait() -> None:
    gate = OutageGate(1.0)
    gate.answered()
    started = time.monotonic()
    assert gate.should_retry(lambda: False, 1, status=502, retry_after=0.2)
    assert gate.in_outage and gate.outages == 1
    while gate.should_retry(lambda: False, 5, status=502, retry_after=0.2):
        assert time.monotonic() - started < 5
    assert 0.9 < time.monotonic() - started < 3
    gate.answered()
    assert not gate.in_outage


def test_gate_stops_waiting_when_the_run_is_interrupted() -> None:
    stop = threading.Event()
    gate = OutageGate(300, stop)
    gate.answered()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    assert not gate.should_retry(lambda: False, 10, status=503, retry_after=60)
    assert time.monotonic() - started < 2
