"""The runner against a real Orthanc: full runs, reruns, crashes, interruptions, retries."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, GeneratedInstance, standard_cohort
from trolley_etl._harness.orthanc import OrthancServer, free_port
from trolley_etl._harness.proxy import FaultProxy
from trolley_etl.runner.report import ROOT_TAG_FILES

ACCESSIONS = ("ACC1001", "ACC1003", "ACC1004")
STUDY_UIDS = {COHORT_ACCESSIONS[a].study_uid for a in ACCESSIONS}


@pytest.fixture(scope="module")
def expected() -> dict[str, GeneratedInstance]:
    return {c.sop_uid: c for c in standard_cohort() if c.study_uid in STUDY_UIDS}


@pytest.fixture(scope="module")
def archive(tmp_path_factory, expected) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-runner")).start()
    try:
        server.upload_many(c.data for c in expected.values())
        yield server
    finally:
        server.stop()


def write_manifest(
    folder: Path,
    url: str,
    *,
    workers: int = 2,
    retries: int = 2,
    accessions: tuple[str, ...] = ACCESSIONS,
    extra: str = "",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cohort.csv").write_text("AccessionNumber\n" + "\n".join(accessions) + "\n")
    path = folder / "pull.yaml"
    path.write_text(
        f"""\
version: 1
name: runner-test
source:
  search: {{backend: qido-rs, url: "{url}/dicom-web"}}
queries:
  - name: cohort
    from_csv: {{path: cohort.csv, column: AccessionNumber}}
storage:
  root: ./data
run:
  workers: {workers}
  retries: {retries}
{extra}"""
    )
    return path


def trolley(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def assert_complete_and_consistent(root: Path, expected: dict[str, GeneratedInstance]) -> None:
    """Exactly the expected files, whole, no temp files, and a checkpoint that agrees."""
    files = sorted(  # everything but .trolley/ and manifest-sha256.txt beside the data
        p
        for p in root.rglob("*")
        if p.is_file()
        and ".trolley" not in p.parts
        and p.relative_to(root).as_posix() not in ROOT_TAG_FILES
    )
    assert len(files) == len(expected)
    for path in files:
        source = expected[path.stem]
        assert path.read_bytes() == source.data, f"{path} differs from the archive's object"
    assert list((root / ".trolley" / "tmp").glob("*")) == []
    with sqlite3.connect(root / ".trolley" / "checkpoint.sqlite") as db:
        recorded = {row[0]: row[1:] for row in db.execute("SELECT path, size, sha256 FROM files")}
        states = dict(db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall())
    assert states == {"done": len(ACCESSIONS)}
    assert set(recorded) == {p.relative_to(root).as_posix() for p in files}
    for path in files:
        size, sha256 = recorded[path.relative_to(root).as_posix()]
        assert size == path.stat().st_size
        assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_full_run_then_rerun_downloads_nothing(archive, expected, tmp_path) -> None:
    manifest = write_manifest(tmp_path, archive.url)
    first = trolley("run", str(manifest))
    assert first.returncode == 0, first.stderr
    root = tmp_path / "data"
    assert_complete_and_consistent(root, expected)

    logged = events(first.stderr)
    for event in logged:
        assert {"timestamp", "level", "event", "run_id", "manifest", "step"} <= set(event)
        assert event["manifest"] == "runner-test"
    steps = [e["step"] for e in logged if e["event"] == "step.start"]
    assert steps == ["search", "expand", "download", "verify"]
    done = [e for e in logged if e["event"] == "item.done"]
    assert {e["study_uid"] for e in done} == STUDY_UIDS
    assert sum(e["instances"] for e in done) == len(expected)
    run_id = logged[0]["run_id"]
    log_file = root / ".trolley" / "logs" / f"{run_id}.jsonl"
    assert [json.loads(line)["event"] for line in log_file.read_text().splitlines()] == [
        e["event"] for e in logged
    ]
    report = json.loads((root / ".trolley" / "reports" / f"{run_id}.json").read_text())
    assert report["status"] == "complete" and report["counts"]["files"] == len(expected)

    # the rerun finds everything done (test_rerun_does_not_contact_the_archive counts requests)
    second = trolley("run", str(manifest))
    assert second.returncode == 0, second.stderr
    assert not [e for e in events(second.stderr) if e["event"] in ("item.done", "search.query")]
    assert_complete_and_consistent(root, expected)

    status = trolley("status", str(manifest))
    assert status.returncode == 0
    assert f"3 done, 0 pending, 0 failed; {len(expected)} files" in status.stdout


def test_rerun_does_not_contact_the_archive(archive, expected, tmp_path) -> None:
    proxy = FaultProxy(archive.url)
    try:
        manifest = write_manifest(tmp_path, proxy.url)
        assert trolley("run", str(manifest)).returncode == 0
        contacted = len(proxy.requests)
        assert contacted > 0
        rerun = trolley("run", str(manifest))
        assert rerun.returncode == 0, rerun.stderr
        assert len(proxy.requests) == contacted
    finally:
        proxy.close()


def test_changed_manifest_asks_for_refresh(archive, expected, tmp_path) -> None:
    manifest = write_manifest(tmp_path, archive.url, accessions=ACCESSIONS[:2])
    assert trolley("run", str(manifest)).returncode == 0
    write_manifest(tmp_path, archive.url, accessions=ACCESSIONS)
    refused = trolley("run", str(manifest))
    assert refused.returncode == 2
    assert "run with --refresh" in refused.stderr
    refreshed = trolley("run", "--refresh", str(manifest))
    assert refreshed.returncode == 0, refreshed.stderr
    assert_complete_and_consistent(tmp_path / "data", expected)
    # run settings are not part of what is pulled: changing workers needs no refresh
    write_manifest(tmp_path, archive.url, accessions=ACCESSIONS, workers=3)
    assert trolley("run", str(manifest)).returncode == 0


# --- crash safety ------------------------------------------------------------------------------

KILL_POINTS = (
    [("after-search", 1), ("after-resolution", 1)]
    + [("after-rename", n) for n in (1, 2, 3, 5, 8, 11, 13, 16, 17)]
    + [("before-item-done", n) for n in (1, 2, 3)]
)


@pytest.mark.parametrize(("point", "hit"), KILL_POINTS, ids=[f"{p}-{n}" for p, n in KILL_POINTS])
def test_sigkill_at_a_crash_point_then_rerun(archive, expected, tmp_path, point, hit) -> None:
    manifest = write_manifest(tmp_path, archive.url, workers=1)
    killed = trolley("run", str(manifest), env={"TROLLEY_ETL_CRASH_AT": f"{point}:{hit}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    rerun = trolley("run", str(manifest))
    assert rerun.returncode == 0, rerun.stderr
    assert_complete_and_consistent(tmp_path / "data", expected)


@pytest.mark.parametrize("damage", ["delete", "truncate", "zero"])
def test_power_loss_before_the_sync_then_rerun_fetches_the_lost_files(
    archive, expected, tmp_path, damage
) -> None:
    """Power-loss simulation (issue 17): killed just before the batch sync, then everything
    not yet marked durable is damaged as a power cut could leave it; the rerun must find
    it by re-hashing, fetch those files again and end complete with exit 0."""
    manifest = write_manifest(tmp_path, archive.url, workers=2)
    root = tmp_path / "data"
    killed = trolley("run", str(manifest), env={"TROLLEY_ETL_CRASH_AT": "before-sync:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with sqlite3.connect(root / ".trolley" / "checkpoint.sqlite") as db:
        unsynced = [
            row[0]
            for row in db.execute(
                "SELECT path FROM files WHERE sop_instance_uid IN "
                "(SELECT sop_instance_uid FROM unsynced)"
            )
        ]
        done = db.execute("SELECT COUNT(*) FROM items WHERE state = 'done'").fetchone()[0]
    assert len(unsynced) == len(expected) and done == len(ACCESSIONS)  # claimed, not durable
    for relative in unsynced:
        path = root / relative
        if damage == "delete":
            path.unlink()
        elif damage == "truncate":
            os.truncate(path, path.stat().st_size // 3)
        else:  # size kept, blocks never written: zeros
            path.write_bytes(bytes(path.stat().st_size))
    rerun = trolley("run", str(manifest))
    assert rerun.returncode == 0, rerun.stderr
    checked = [e for e in events(rerun.stderr) if e.get("event") == "storage.unsynced_checked"]
    assert checked and checked[0]["lost"] == len(expected)
    assert_complete_and_consistent(root, expected)
    with sqlite3.connect(root / ".trolley" / "checkpoint.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM unsynced").fetchone()[0] == 0  # all synced


def test_a_crash_before_the_sync_loses_nothing_that_survived(archive, expected, tmp_path) -> None:
    """Killed before the sync, no power cut: the files are intact, so the rerun re-hashes
    them, syncs, clears the list and fetches nothing again."""
    manifest = write_manifest(tmp_path, archive.url, workers=2)
    killed = trolley("run", str(manifest), env={"TROLLEY_ETL_CRASH_AT": "before-sync:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    rerun = trolley("run", str(manifest))
    assert rerun.returncode == 0, rerun.stderr
    checked = [e for e in events(rerun.stderr) if e.get("event") == "storage.unsynced_checked"]
    assert checked[0]["files"] == len(expected) and checked[0]["lost"] == 0
    downloads = [e for e in events(rerun.stderr) if e.get("event") == "item.done"]
    assert downloads == []
    assert_complete_and_consistent(tmp_path / "data", expected)


@pytest.mark.parametrize("delay", [0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.2, 1.6])
def test_sigkill_at_random_moments_then_rerun(archive, expected, tmp_path, delay) -> None:
    proxy = FaultProxy(archive.url)
    proxy.delay = 0.05  # stretch the run so that the kill lands in different steps
    try:
        manifest = write_manifest(tmp_path, proxy.url, workers=2)
        process = subprocess.Popen(
            [sys.executable, "-m", "trolley_etl", "run", str(manifest)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        rerun = trolley("run", str(manifest))
        assert rerun.returncode == 0, rerun.stderr
        assert_complete_and_consistent(tmp_path / "data", expected)
    finally:
        proxy.close()


def test_sigint_stops_cleanly_with_130(archive, expected, tmp_path) -> None:
    proxy = FaultProxy(archive.url)
    proxy.delay = 0.4
    try:
        manifest = write_manifest(tmp_path, proxy.url, workers=1)
        process = subprocess.Popen(
            [sys.executable, "-m", "trolley_etl", "run", str(manifest)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        for line in process.stderr:
            if '"event": "step.start"' in line and '"download"' in line:
                break
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=60)
        assert process.returncode == 130, rest
        assert_checkpoint_matches_disk(tmp_path / "data")
        with sqlite3.connect(tmp_path / "data" / ".trolley" / "checkpoint.sqlite") as db:
            assert db.execute("SELECT status FROM runs").fetchone() == ("interrupted",)
        proxy.delay = 0
        rerun = trolley("run", str(manifest))
        assert rerun.returncode == 0, rerun.stderr
        assert_complete_and_consistent(tmp_path / "data", expected)
    finally:
        proxy.close()


def assert_checkpoint_matches_disk(root: Path) -> None:
    files = {
        p.relative_to(root).as_posix() for p in root.rglob("*.dcm") if ".trolley" not in p.parts
    }
    with sqlite3.connect(root / ".trolley" / "checkpoint.sqlite") as db:
        recorded = {row[0] for row in db.execute("SELECT path FROM files")}
    assert recorded <= files
    assert list((root / ".trolley" / "tmp").glob("*")) == []


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.archive
def test_server_stopped_mid_run_then_restarted(tmp_path, expected) -> None:
    server = OrthancServer(tmp_path / "orthanc").start()
    proxy = FaultProxy(server.url)
    try:
        server.upload_many(c.data for c in expected.values())
        proxy.delay = 0.3
        # outage_wait 0: fail at once instead of waiting out the outage (test_outage.py)
        manifest = write_manifest(
            tmp_path / "pull", proxy.url, workers=1, retries=1, extra="  outage_wait: 0\n"
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "trolley_etl", "run", str(manifest)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        seen = []
        for line in process.stderr:
            seen.append(line)
            if '"event": "item.done"' in line:
                server.stop()
                break
        _, rest = process.communicate(timeout=120)
        assert process.returncode == 1, "".join(seen) + rest
        failed = [e for e in events(rest) if e["event"] == "item.failed"]
        assert failed and all(
            e["error_type"] == "BackendError" and "502" in e["error"] for e in failed
        )
        status = trolley("status", str(manifest), "--format", "json")
        assert status.returncode == 1
        assert json.loads(status.stdout)["counts"]["failed"] == len(failed)

        server.restart()
        proxy.delay = 0
        rerun = trolley("run", str(manifest))
        assert rerun.returncode == 0, rerun.stderr
        assert_complete_and_consistent(tmp_path / "pull" / "data", expected)
    finally:
        proxy.close()
        server.stop()


def test_503_with_retry_after_is_waited_for(archive, expected, tmp_path) -> None:
    proxy = FaultProxy(archive.url)
    try:
        proxy.fail_next(3, 503, {"Retry-After": "1"}, prefix="/dicom-web/studies/")
        manifest = write_manifest(tmp_path, proxy.url, workers=1, retries=3)
        started = time.monotonic()
        result = trolley("run", str(manifest))
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started >= 3  # three waits of one second
        retries = [e for e in events(result.stderr) if e["event"] == "item.retry"]
        assert len(retries) == 3 and all("503" in e["error"] for e in retries)
        assert [status for _, status in proxy.requests].count(503) == 3
        assert_complete_and_consistent(tmp_path / "data", expected)
    finally:
        proxy.close()


def test_exit_codes_for_bad_input_and_unreachable_servers(archive, tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nname: x\n")
    result = trolley("run", str(bad))
    assert result.returncode == 2
    assert f"{bad}:1:1: source: required field is missing" in result.stderr

    dead = f"http://127.0.0.1:{free_port()}"
    manifest = write_manifest(tmp_path / "dead", dead)
    result = trolley("run", str(manifest))
    assert result.returncode == 3
    assert f"{dead}/dicom-web/studies" in result.stderr

    plan = trolley("plan", str(write_manifest(tmp_path / "plan", archive.url)))
    assert plan.returncode == 0, plan.stderr
    assert "3 studies, 3 retrieval items" in plan.stdout
    assert not (tmp_path / "plan" / "data").exists()
    dry = trolley("run", "--dry-run", str(tmp_path / "plan" / "pull.yaml"))
    assert dry.returncode == 0 and "3 studies" in dry.stdout
    assert not (tmp_path / "plan" / "data").exists()
    assert trolley("status", str(tmp_path / "plan" / "pull.yaml")).returncode == 2


def test_bad_credentials_exit_3_and_never_leak(orthanc_auth, tmp_path) -> None:
    manifest = tmp_path / "auth.yaml"
    manifest.write_text(
        f"""\
version: 1
name: auth-test
source:
  search:
    backend: qido-rs
    url: {orthanc_auth.dicomweb_url}
    auth: {{type: basic, username_env: TEST_USER, password_env: TEST_PASSWORD}}
queries:
  - name: all
    filters: {{PatientID: "*"}}
storage:
  root: ./data
"""
    )
    env = {"TEST_USER": "alice", "TEST_PASSWORD": "wrong-but-secret-value"}
    result = trolley("run", str(manifest), env=env)
    assert result.returncode == 3
    assert "refused the credentials" in result.stderr
    logs = tmp_path / "data" / ".trolley" / "logs"
    text = result.stderr + "".join(p.read_text() for p in logs.glob("*.jsonl"))
    assert "wrong-but-secret-value" not in text
    good = trolley("run", str(manifest), env={**env, "TEST_PASSWORD": "s3cret-pass"})
    assert good.returncode == 0, good.stderr
    assert "s3cret-pass" not in good.stderr


def _run_on_a_terminal(manifest: Path, *extra: str) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal, as a user at a shell would."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "trolley_etl", "run", *extra, str(manifest)],
        stdout=subprocess.DEVNULL,
        stderr=slave,
    )
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    return process.wait(timeout=60), output.decode("utf-8", "replace")


def test_terminal_gets_readable_logs_and_a_progress_bar(archive, expected, tmp_path) -> None:
    manifest = write_manifest(tmp_path, archive.url, workers=1)
    code, screen = _run_on_a_terminal(manifest)
    assert code == 0, screen
    assert "search..." in screen and '{"timestamp"' not in screen  # for people, not JSON
    assert f"{len(expected)} instances" in screen and "KiB" in screen and "items" in screen
    quiet_code, quiet_screen = _run_on_a_terminal(
        write_manifest(tmp_path / "quiet", archive.url), "--quiet"
    )
    assert quiet_code == 0
    assert "%|" not in quiet_screen and "search..." not in quiet_screen  # no bar, no steps
    assert quiet_screen.startswith("complete: 3 studies")  # only the closing summary
