"""Time windows: the rules, the gate, and runs against Orthanc that wait for their window."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl.cli.main import main
from trolley_etl.core.errors import ManifestError, OutsideWindowError
from trolley_etl.manifest import load_manifest
from trolley_etl.runner.window import (
    WAITING_FILE,
    TimeWindow,
    WindowGate,
    check_no_wait,
    waiting_state,
)

UTC = dt.timezone.utc
AMS = "Europe/Amsterdam"


def at(text: str, zone: str = AMS) -> dt.datetime:
    from zoneinfo import ZoneInfo

    return dt.datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone))


def test_a_night_window_crosses_midnight_and_belongs_to_its_start_day() -> None:
    window = TimeWindow.parse("19:00-07:00", ["fri"], AMS)  # 2024-03-01 was a Friday
    assert not window.is_open(at("2024-03-01T18:59:59"))
    assert window.is_open(at("2024-03-01T19:00:00"))
    assert window.is_open(at("2024-03-02T06:59:59"))  # Saturday morning: Friday's night
    assert not window.is_open(at("2024-03-02T07:00:00"))
    assert not window.is_open(at("2024-03-02T20:00:00"))  # Saturday night is not listed
    assert window.next_open(at("2024-03-02T07:00:00")) == at("2024-03-08T19:00:00")
    assert window.next_open(at("2024-03-01T20:00:00")) == at("2024-03-01T20:00:00")


def test_time_zones_and_whole_days() -> None:
    window = TimeWindow.parse("19:00-07:00", None, AMS)
    # 18:30 UTC is 19:30 in Amsterdam in winter (UTC+1)
    assert window.is_open(dt.datetime(2024, 1, 10, 18, 30, tzinfo=UTC))
    assert not window.is_open(dt.datetime(2024, 7, 10, 16, 30, tzinfo=UTC))  # 18:30 CEST
    weekend = TimeWindow.parse("00:00-24:00", ["sat", "sun"], AMS)
    assert weekend.is_open(at("2024-03-02T00:00:00")) and weekend.is_open(at("2024-03-03T23:59"))
    assert not weekend.is_open(at("2024-03-04T00:00:00"))
    assert weekend.next_open(at("2024-03-04T09:00:00")) == at("2024-03-09T00:00:00")
    all_day = TimeWindow.parse("06:00-06:00", ["mon"], "UTC")  # start == end: 24 hours
    assert all_day.is_open(dt.datetime(2024, 3, 5, 5, 59, tzinfo=UTC))


def _manifest(folder: Path, url: str, window: str, name: str = "window-test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.yaml"
    path.write_text(
        f"""\
version: 1
name: {name}
source:
  search: {{backend: qido-rs, url: "{url}"}}
queries:
  - name: one
    filters: {{AccessionNumber: ACC1003}}
storage:
  root: ./data
run:
  workers: 2
  window: {window}
"""
    )
    return path


@pytest.mark.parametrize(
    ("window", "message"),
    [
        ('{hours: "7-19"}', "String should match pattern"),
        ('{hours: "19:00-25:00"}', "not a time of day"),
        ('{hours: "19:00-07:00", days: [monday]}', "Input should be 'mon'"),
        ('{hours: "19:00-07:00", timezone: Mars/Olympus}', "unknown time zone"),
    ],
)
def test_bad_windows_are_manifest_errors(tmp_path: Path, window: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        load_manifest(_manifest(tmp_path, "http://pacs/dicom-web", window))


class FakeClock:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now


class ListLog:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **fields: object) -> None:
        self.events.append((event, fields))

    warning = info


def test_gate_drains_then_waits_until_the_window_opens(tmp_path: Path) -> None:
    window = TimeWindow.parse("19:00-07:00", None, "UTC")
    clock = FakeClock(dt.datetime(2024, 3, 1, 18, 59, 59, tzinfo=UTC))
    log = ListLog()
    gate = WindowGate(window, log=log, state_dir=tmp_path, run_id="r1", clock=clock)
    order: list[str] = []

    def drain() -> None:
        order.append("drained")
        assert not (tmp_path / WAITING_FILE).exists()  # in-flight units finish first

    def open_later() -> None:
        time.sleep(0.3)
        order.append("opened")
        clock.now = dt.datetime(2024, 3, 1, 19, 0, 0, tzinfo=UTC)

    noted: list[dict] = []

    def watch() -> None:
        time.sleep(0.15)
        noted.append(json.loads((tmp_path / WAITING_FILE).read_text()))

    opener = threading.Thread(target=open_later)
    opener.start()
    watcher = threading.Thread(target=watch)
    watcher.start()
    gate.hold(drain)
    opener.join()
    watcher.join()
    assert order == ["drained", "opened"]
    assert noted[0]["run_id"] == "r1" and noted[0]["until"] == "2024-03-01T19:00:00+00:00"
    assert [e for e, _ in log.events] == ["window.closed", "window.open"]
    assert log.events[0][1]["until"] == "2024-03-01T19:00:00+00:00"
    assert not (tmp_path / WAITING_FILE).exists()
    order.clear()
    gate.hold(drain)  # inside the window: nothing to drain, no wait
    assert order == []


def test_no_wait_outside_the_window_is_refused() -> None:
    class Config:
        hours, days, timezone = "19:00-07:00", None, "UTC"

    noon = dt.datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    with pytest.raises(OutsideWindowError, match="opens at 2024-03-01T19:00"):
        check_no_wait(Config, ignore=False, now=noon)
    check_no_wait(Config, ignore=True, now=noon)
    check_no_wait(Config, ignore=False, now=noon.replace(hour=20))


def _span_from_now(start_s: float, length_s: float) -> str:
    now = dt.datetime.now(UTC)
    first, last = now + dt.timedelta(seconds=start_s), now + dt.timedelta(seconds=length_s)
    return f'{{hours: "{first:%H:%M:%S}-{last:%H:%M:%S}", timezone: UTC}}'


def test_no_wait_exits_3_and_ignore_window_runs(
    orthanc: OrthancServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _manifest(tmp_path, orthanc.dicomweb_url, _span_from_now(3600, 7200))
    assert main(["run", str(manifest), "--no-wait", "--log-format", "json"]) == 3
    assert "outside the time window" in capsys.readouterr().err
    assert not (tmp_path / "data" / ".trolley" / "checkpoint.sqlite").exists()
    assert main(["run", str(manifest), "--ignore-window", "--log-format", "json"]) == 0


def test_a_run_started_before_its_window_waits_for_it(
    orthanc: OrthancServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    opens_in = 8.0  # room for the new process to start and reach the window on a busy machine
    manifest = _manifest(tmp_path, orthanc.dicomweb_url, _span_from_now(opens_in, 3600))
    log = tmp_path / "run.jsonl"
    started = time.time()
    command = ["run", str(manifest), "--log-format", "json", "--log-file", str(log)]
    process = subprocess.Popen(
        [sys.executable, "-m", "trolley_etl", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        state = tmp_path / "data" / ".trolley"
        deadline = time.monotonic() + opens_in - 1
        while waiting_state(state) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert waiting_state(state) is not None, "the run never said it was waiting"
        capsys.readouterr()
        main(["status", str(manifest)])
        assert "is waiting for its time window until" in capsys.readouterr().out
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names.index("window.closed") < names.index("window.open") < names.index("search.query")
    contact = dt.datetime.fromisoformat(events[names.index("search.query")]["timestamp"])
    assert contact.timestamp() >= started + opens_in - 1.0  # HH:MM:SS rounds down a second
    assert waiting_state(state) is None


def test_no_wait_gate_stops_after_draining(tmp_path: Path) -> None:
    window = TimeWindow.parse("19:00-07:00", None, "UTC")
    clock = FakeClock(dt.datetime(2024, 3, 1, 7, 0, 0, tzinfo=UTC))
    gate = WindowGate(
        window, log=ListLog(), state_dir=tmp_path, run_id="r", clock=clock, no_wait=True
    )
    drained: list[bool] = []
    with pytest.raises(OutsideWindowError, match="opens again at 2024-03-01T19:00"):
        gate.hold(lambda: drained.append(True))
    assert drained == [True] and not (tmp_path / WAITING_FILE).exists()


def test_a_window_closing_mid_run_with_no_wait_stops_cleanly(
    orthanc: OrthancServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Units in flight finish, the run exits 3, and the next run resumes the rest."""
    from trolley_etl._harness.proxy import FaultProxy

    proxy = FaultProxy(orthanc.url)
    # 12 instances in 4 series units, one by one (one connection): any three units take
    # 6.4 s or more, so the window, closing after 4 s, stops the run before the last
    proxy.delay = 0.8
    now = dt.datetime.now(UTC)
    closes = now + dt.timedelta(seconds=4)
    window = f'{{hours: "{now - dt.timedelta(hours=1):%H:%M:%S}-{closes:%H:%M:%S}", timezone: UTC}}'
    path = tmp_path / "m.yaml"
    path.write_text(
        f"""\
version: 1
name: window-closes
source:
  search: {{backend: qido-rs, url: "{orthanc.dicomweb_url}"}}
  download: {{backend: wado-uri, url: "{proxy.url}/wado", max_connections: 1}}
queries:
  - name: two
    from_csv: {{path: cohort.csv, column: AccessionNumber}}
storage:
  root: ./data
run:
  workers: 1
  window: {window}
"""
    )
    (tmp_path / "cohort.csv").write_text("AccessionNumber\nACC1001\nACC1003\n")
    try:
        assert main(["run", str(path), "--no-wait", "--log-format", "json"]) == 3
        assert "the time window closed" in capsys.readouterr().err
        assert main(["status", str(path), "--format", "json"]) == 1
        status = json.loads(capsys.readouterr().out)
        counts = status["counts"]
        # one unit per series (WADO-URI batches a series' instances, issue 17)
        assert 0 < counts["done"] < 4 and counts["done"] + counts["pending"] == 4
        assert 0 < counts["files"] < 12
        assert not list((tmp_path / "data" / ".trolley").rglob("*.part"))
        assert main(["run", str(path), "--ignore-window", "--log-format", "json"]) == 0
    finally:
        proxy.close()
    assert len(list((tmp_path / "data").rglob("*.dcm"))) == 12
