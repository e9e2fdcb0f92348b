"""Caps per backend (max_connections, rate_limit), measured by counting proxies.

The proxies sit between trolley-etl and a real Orthanc: a TCP proxy times every connection
(HTTP or DICOM), an HTTP proxy times every request and slows each answer down a little, so
that workers really overlap and a missing cap would show.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import pytest

from trolley_etl import StorageDir, Trolley
from trolley_etl._harness.dicomgen import GeneratedInstance
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl._harness.proxy import CountingTcpProxy, FaultProxy
from trolley_etl.backends import CGet, WadoRS
from trolley_etl.backends.limits import BackendLimits, RateLimiter
from trolley_etl.cli.main import main
from trolley_etl.core.errors import ManifestError
from trolley_etl.core.model import InstanceReference, StudyReference
from trolley_etl.manifest import load_manifest

ACCESSIONS = ("ACC1001", "ACC1003")


def assert_rate(times: list[float], per_second: float, tolerance: float = 0.05) -> None:
    """No window of one second holds more than `per_second` starts."""
    times = sorted(times)
    n = int(per_second)
    for first, later in zip(times, times[n:], strict=False):
        assert later - first >= 1.0 - tolerance, f"{n + 1} starts within {later - first:.3f} s"


def instances_of(cohort: list[GeneratedInstance]) -> list[InstanceReference]:
    from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS

    studies = {COHORT_ACCESSIONS[a].study_uid for a in ACCESSIONS}
    return [
        InstanceReference(c.study_uid, c.series_uid, c.sop_uid)
        for c in cohort
        if c.study_uid in studies
    ]


def test_run_keeps_to_the_connection_and_request_caps(
    orthanc: OrthancServer, tmp_path: Path, cohort: list[GeneratedInstance]
) -> None:
    """Six workers, a WADO-URI download capped at 2 connections and 3 requests a second."""
    http = FaultProxy(orthanc.url)
    http.delay = 0.4  # longer than the 0.33 s between starts: two requests overlap
    tcp = CountingTcpProxy(int(http.url.rsplit(":", 1)[1]))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"""\
version: 1
name: caps
source:
  search: {{backend: qido-rs, url: "{orthanc.dicomweb_url}"}}
  download:
    backend: wado-uri
    url: "http://127.0.0.1:{tcp.port}/wado"
    max_connections: 2
    rate_limit: {{requests_per_second: 3}}
queries:
  - name: two
    filters: {{AccessionNumber: [{", ".join(ACCESSIONS)}]}}
storage:
  root: ./data
run:
  workers: 6
"""
    )
    log = tmp_path / "log.jsonl"
    try:
        code = main(["run", str(manifest), "--log-format", "json", "--log-file", str(log)])
    finally:
        tcp.close()
        http.close()
    assert code == 0
    expected = len(instances_of(cohort))
    assert len(http.started) == expected
    assert tcp.max_open() == 2  # both connections used, never a third
    # two connections alone would allow 5 a second; arrival jitter gets 0.1 s
    assert_rate(http.started, 3, tolerance=0.1)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    caps = [e for e in events if e["event"] == "backend.limits" and e["role"] == "download"]
    assert caps and caps[0]["max_connections"] == 2 and caps[0]["requests_per_second"] == 3


def test_dicom_associations_keep_to_the_caps(
    orthanc: OrthancServer,
    tmp_path: Path,
    cohort: list[GeneratedInstance],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """C-GET with six workers: at most 2 associations open, at most 5 C-GETs a second.

    Associations are kept open and reused (issue 17), so the rate cap counts the C-GET
    requests sent on them, timed as they are sent."""
    from pynetdicom.association import Association

    sent: list[float] = []
    send_c_get = Association.send_c_get

    def timed(self: Association, *args: object, **kwargs: object) -> object:
        sent.append(time.monotonic())
        return send_c_get(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Association, "send_c_get", timed)
    tcp = CountingTcpProxy(orthanc.dicom_port)
    limits = BackendLimits(max_connections=2, requests_per_second=5)
    refs = instances_of(cohort)
    try:
        downloader = CGet("127.0.0.1", tcp.port, orthanc.aet, limits=limits)
        with Trolley(downloader=downloader, workers=6) as trolley:
            stored = trolley.download(refs, tmp_path / "out")
    finally:
        tcp.close()
    assert len(stored) == len(refs)
    assert len(sent) == len(refs)  # one C-GET per instance
    assert 1 <= len(tcp.opened) <= 2  # on at most two associations, kept open
    assert tcp.max_open(grace=0.1) <= 2
    # send times jitter with the load of the machine (a thread woken late by the rate cap
    # sends late); unlimited, six workers would send six C-GETs within a few hundredths
    assert_rate(sent, 5, tolerance=0.3)


def test_byte_rate_slows_the_download(orthanc: OrthancServer, tmp_path: Path) -> None:
    from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS

    rate = 0.05  # MB/s
    downloader = WadoRS(orthanc.dicomweb_url)
    downloader.http.configure(limits=BackendLimits(megabytes_per_second=rate))
    study = StudyReference(COHORT_ACCESSIONS["ACC1004"].study_uid)
    started = time.monotonic()
    stored = Trolley(downloader=downloader, storage=StorageDir(tmp_path)).download([study])
    elapsed = time.monotonic() - started
    size = sum(s.size for s in stored)
    burst = rate * 1e6 / 4
    assert size > 60_000
    assert elapsed >= (size - burst) / (rate * 1e6) - 0.05


def test_rate_limiter_spaces_starts_across_threads() -> None:
    limiter = RateLimiter(20)
    times: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(5):
            time.sleep(limiter.reserve())
            with lock:
                times.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    times.sort()
    assert len(times) == 20
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.05 - 0.01
    assert times[-1] - times[0] >= 19 / 20 - 0.02


def _manifest(tmp_path: Path, backend: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(
        f"""\
version: 1
name: caps
source:
  search: {{{backend}}}
queries:
  - name: q
    filters: {{StudyDate: 20240101}}
storage:
  root: ./data
"""
    )
    return path


def test_manifest_caps_default_and_validation(tmp_path: Path) -> None:
    manifest = load_manifest(_manifest(tmp_path, "backend: qido-rs, url: http://pacs/dicom-web"))
    search = manifest.source.search
    assert search.max_connections == 4 and search.rate_limit is None  # type: ignore[union-attr]
    with pytest.raises(ManifestError, match="requests_per_second, megabytes_per_second"):
        load_manifest(
            _manifest(tmp_path, "backend: qido-rs, url: http://pacs/dicom-web, rate_limit: {}")
        )
    with pytest.raises(ManifestError, match="max_connections"):
        load_manifest(
            _manifest(
                tmp_path,
                "backend: dicom-qr, host: pacs, port: 104, called_aet: PACS, max_connections: 0",
            )
        )
