"""`run.executor: dask` on a local cluster of 2 worker processes, Orthanc and SeaweedFS on
loopback: the same results as the threads executor, and the same guarantees when a worker or
the driver is SIGKILLed mid-run (the crash-point tests of test_runner.py, with Dask)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from tests.test_object_storage_cli import (
    KEY_ENV,
    SECRET_ENV,
    STUDY_UIDS,
    assert_bucket_is_the_cohort,
    store_of,
    write_manifest,
)
from tests.test_runner import assert_complete_and_consistent
from tests.test_runner import write_manifest as write_local_manifest
from trolley_etl._harness.dicomgen import GeneratedInstance, standard_cohort
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl._harness.proxy import FaultProxy
from trolley_etl._harness.seaweedfs import SeaweedS3

pytest.importorskip("distributed")
pytestmark = [pytest.mark.archive, pytest.mark.subprocess, pytest.mark.slow]


@pytest.fixture(scope="module")
def expected() -> dict[str, GeneratedInstance]:
    return {c.sop_uid: c for c in standard_cohort() if c.study_uid in STUDY_UIDS}


@pytest.fixture(scope="module")
def archive(tmp_path_factory, expected) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-dask")).start()
    try:
        server.upload_many(c.data for c in expected.values())
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory) -> Iterator[SeaweedS3]:
    with SeaweedS3(tmp_path_factory.mktemp("seaweed-dask"), buckets=["cohorts"]) as server:
        yield server


class CountingProxy(FaultProxy):
    """Counts retrievals in flight at once, whichever worker process sent them."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.in_flight = 0
        self.most_in_flight = 0
        self._count_lock = threading.Lock()

    def _handle(self, handler) -> None:  # type: ignore[no-untyped-def]
        with self._count_lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            super()._handle(handler)
        finally:
            with self._count_lock:
                self.in_flight -= 1


def env_of(seaweed: SeaweedS3, **extra: str) -> dict[str, str]:
    return {**os.environ, KEY_ENV: seaweed.access_key, SECRET_ENV: seaweed.secret_key, **extra}


def trolley(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args, "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def leftover_workers(pids: set[int]) -> None:
    """Worker processes of a SIGKILLed driver: gone within seconds, else ended here."""
    deadline = time.monotonic() + 20
    alive = {p for p in pids if psutil.pid_exists(p)}
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = {p for p in alive if psutil.pid_exists(p)}
    for pid in alive:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def test_dask_pull_into_a_bucket_equals_the_archive(archive, seaweed, expected, tmp_path):
    manifest = write_manifest(
        tmp_path, archive.url, seaweed.endpoint_url, "dask-full", run="  executor: dask\n"
    )
    done = trolley("run", str(manifest), env=env_of(seaweed))
    assert done.returncode == 0, done.stderr
    assert '"executor.dask"' in done.stderr and '"workers": 2' in done.stderr
    assert_bucket_is_the_cohort(store_of(seaweed, "dask-full"), tmp_path / "s3cli.state", expected)
    again = trolley("run", str(manifest), env=env_of(seaweed))
    assert again.returncode == 0, again.stderr
    assert '"executor.dask"' not in again.stderr  # nothing to do: no cluster started


def test_dask_pull_into_a_local_folder_equals_the_threads_pull(archive, expected, tmp_path):
    manifest = write_local_manifest(tmp_path, archive.url, workers=2)
    done = trolley("run", str(manifest), "--executor", "dask", env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert_complete_and_consistent(tmp_path / "data", expected)


def test_a_worker_sigkilled_mid_run_is_replaced_and_the_bucket_matches(
    archive, seaweed, expected, tmp_path
) -> None:
    proxy = CountingProxy(archive.url)
    proxy.delay = 1.5  # every answer slow: both workers are mid-unit when one is killed
    try:
        manifest = write_manifest(
            tmp_path, archive.url, seaweed.endpoint_url, "workerkill", run="  executor: dask\n"
        )
        download = f'  download: {{backend: wado-rs, url: "{proxy.url}/dicom-web"}}\n'
        manifest.write_text(manifest.read_text().replace("queries:", download + "queries:"))
        log = tmp_path / "run.jsonl"
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trolley_etl",
                "run",
                str(manifest),
                "--log-format",
                "json",
                "--log-file",
                str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env_of(seaweed),
        )
        try:
            deadline = time.monotonic() + 60
            while proxy.in_flight < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proxy.in_flight >= 2, "the workers never started their units"
            workers = [
                p
                for p in psutil.Process(process.pid).children(recursive=True)
                if "spawn_main" in " ".join(p.cmdline())
            ]
            assert len(workers) >= 2
            workers[0].kill()
            _, stderr = process.communicate(timeout=180)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
        assert process.returncode == 0, stderr
    finally:
        proxy.close()
    assert_bucket_is_the_cohort(store_of(seaweed, "workerkill"), tmp_path / "s3cli.state", expected)


@pytest.mark.parametrize("cap", [1, 2])
def test_max_connections_hold_across_the_cluster(archive, seaweed, tmp_path, cap) -> None:
    proxy = CountingProxy(archive.url)
    proxy.delay = 0.5
    try:
        manifest = write_manifest(
            tmp_path, archive.url, seaweed.endpoint_url, f"cap{cap}", run="  executor: dask\n"
        )
        download = (
            f'  download: {{backend: wado-rs, url: "{proxy.url}/dicom-web", '
            f"max_connections: {cap}}}\n"
        )
        manifest.write_text(manifest.read_text().replace("queries:", download + "queries:"))
        done = trolley("run", str(manifest), env=env_of(seaweed))
        assert done.returncode == 0, done.stderr
    finally:
        proxy.close()
    # two worker processes, each with its own in-process cap: only the cluster-wide lease
    # keeps the archive at `cap` connections (and 2 is reached: the count can see it)
    assert proxy.most_in_flight == cap


DASK_KILL_POINTS = [
    ("after-search", 1),
    ("after-resolution", 1),
    ("after-rename", 1),
    ("after-rename", 2),
    ("before-item-done", 1),
    ("before-item-done", 3),
]


@pytest.mark.parametrize(
    ("point", "hit"), DASK_KILL_POINTS, ids=[f"{p}-{n}" for p, n in DASK_KILL_POINTS]
)
def test_driver_sigkilled_at_a_crash_point_then_rerun(
    archive, seaweed, expected, tmp_path, point, hit
) -> None:
    prefix = f"driver-{point}-{hit}"
    manifest = write_manifest(
        tmp_path, archive.url, seaweed.endpoint_url, prefix, run="  executor: dask\n"
    )
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    process = subprocess.Popen(
        [sys.executable, "-m", "trolley_etl", "run", str(manifest), "--log-format", "json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env_of(seaweed, TROLLEY_ETL_CRASH_AT=f"{point}:{hit}"),
    )
    workers: set[int] = set()
    try:
        while process.poll() is None:
            with contextlib.suppress(psutil.Error):
                workers |= {p.pid for p in psutil.Process(process.pid).children(recursive=True)}
            time.sleep(0.05)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    leftover_workers(workers - before)
    assert process.returncode == -signal.SIGKILL, stderr
    rerun = trolley("run", str(manifest), env=env_of(seaweed))
    assert rerun.returncode == 0, rerun.stderr
    assert_bucket_is_the_cohort(store_of(seaweed, prefix), tmp_path / "s3cli.state", expected)


def test_c_move_is_refused_with_dask(tmp_path) -> None:
    manifest = tmp_path / "move.yaml"
    manifest.write_text("""\
version: 1
name: move
source:
  search: {backend: dicom-qr, host: 127.0.0.1, port: 9, called_aet: PACS, calling_aet: ME}
  download: {backend: c-move, host: 127.0.0.1, port: 9, called_aet: PACS, calling_aet: ME,
             move_destination: {aet: ME, port: 11113}}
queries:
  - name: all
    filters: {PatientID: "1"}
storage:
  root: ./data
run:
  executor: dask
""")
    refused = trolley("run", str(manifest), env=dict(os.environ))
    assert refused.returncode == 2, refused.stderr
    assert "cannot use c-move" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_existing_cluster_via_scheduler(
    archive, seaweed, expected, tmp_path, monkeypatch
) -> None:
    """`--scheduler tcp://...`: the run submits to a cluster it did not start, and leaves it
    running when it ends. The workers have the bucket's credentials in their environment
    (under the names the manifest gives), as on a real cluster: nothing secret is sent."""
    from distributed import Client, LocalCluster

    monkeypatch.setenv(KEY_ENV, seaweed.access_key)  # inherited by the worker processes
    monkeypatch.setenv(SECRET_ENV, seaweed.secret_key)

    with (
        LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        manifest = write_manifest(tmp_path, archive.url, seaweed.endpoint_url, "scheduler")
        done = trolley(
            "run", str(manifest), "--scheduler", cluster.scheduler_address, env=env_of(seaweed)
        )
        assert done.returncode == 0, done.stderr
        assert cluster.scheduler_address in done.stderr  # the executor.dask event names it
        assert len(client.scheduler_info()["workers"]) == 2  # still there
    assert_bucket_is_the_cohort(store_of(seaweed, "scheduler"), tmp_path / "s3cli.state", expected)


def test_sigint_under_dask_stops_with_130_then_resumes(archive, expected, tmp_path) -> None:
    proxy = FaultProxy(archive.url)
    proxy.delay = 0.5
    try:
        manifest = write_local_manifest(tmp_path, proxy.url, workers=2, extra="  executor: dask\n")
        process = subprocess.Popen(
            [sys.executable, "-m", "trolley_etl", "run", str(manifest), "--log-format", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        for line in process.stderr:
            if '"executor.dask"' in line:
                break
        time.sleep(0.3)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=60)
        assert process.returncode == 130, rest
        assert time.monotonic() - started < 30  # the cluster is closed, not waited out
        proxy.delay = 0
        rerun = trolley("run", str(manifest), env=dict(os.environ))
        assert rerun.returncode == 0, rerun.stderr
        assert_complete_and_consistent(tmp_path / "data", expected)
    finally:
        proxy.close()


@pytest.mark.parametrize(("point", "hit"), [("after-rename", 2), ("before-item-done", 2)])
def test_driver_sigkilled_with_a_local_root_then_rerun(archive, expected, tmp_path, point, hit):
    manifest = write_local_manifest(tmp_path, archive.url, workers=2, extra="  executor: dask\n")
    killed = trolley(
        "run", str(manifest), env={**os.environ, "TROLLEY_ETL_CRASH_AT": f"{point}:{hit}"}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    time.sleep(1)  # its worker processes notice and exit
    rerun = trolley("run", str(manifest), env=dict(os.environ))
    assert rerun.returncode == 0, rerun.stderr
    assert_complete_and_consistent(tmp_path / "data", expected)


def test_an_unreachable_scheduler_exits_3_in_one_line(archive, tmp_path) -> None:
    from trolley_etl._harness.orthanc import free_port

    manifest = write_local_manifest(tmp_path, archive.url)
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    refused = trolley("run", str(manifest), "--scheduler", address, env=dict(os.environ))
    assert refused.returncode == 3, refused.stderr
    assert "cannot reach the Dask scheduler" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert time.monotonic() - started < 60  # bounded by the connect timeout
