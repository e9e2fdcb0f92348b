"""`{last: 7d}` filters: resolved at search time from a fixed clock, recorded in the log, the
report and the lock; a scheduled `run --refresh` adds the new studies and skips done ones."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl.core.relative_dates import RelativeDate, resolve_filters
from trolley_etl.runner.checkpoint import Checkpoint


@pytest.mark.parametrize(
    ("spec", "today", "expected"),
    [
        ("7d", "2024-01-16", "20240109-20240116"),
        ("2w", "2024-01-16", "20240102-20240116"),
        ("1m", "2024-03-31", "20240229-20240331"),  # clamps to the end of February
        ("3m", "2024-01-15", "20231015-20240115"),  # across a year
        ("1y", "2024-02-29", "20230228-20240229"),
        ("1d", "2024-01-01", "20231231-20240101"),
    ],
)
def test_relative_dates_resolve_against_the_given_day(spec, today, expected) -> None:
    assert RelativeDate(last=spec).resolve(dt.date.fromisoformat(today)) == expected


def test_only_relative_values_are_replaced() -> None:
    filters = {"StudyDate": RelativeDate(last="7d"), "Modality": "CT"}
    assert resolve_filters(filters, dt.date(2024, 1, 16)) == {
        "StudyDate": "20240109-20240116",
        "Modality": "CT",
    }


def trolley(*args: str, today: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TROLLEY_ETL_TODAY": today}
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args, "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def stored_studies(root: Path) -> dict[str, str]:
    """Study UID -> the earliest stored_at of its files."""
    checkpoint = Checkpoint(root / ".trolley" / "checkpoint.sqlite")
    try:
        seen: dict[str, str] = {}
        for record in checkpoint.files():
            seen[record["study_uid"]] = min(seen.get(record["study_uid"], "~"), record["stored_at"])
        return seen
    finally:
        checkpoint.close()


def test_a_scheduled_refresh_adds_new_studies_and_records_the_range(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    manifest = tmp_path / "recent.yaml"
    manifest.write_text(f"""\
version: 1
name: recent
source:
  search: {{backend: qido-rs, url: "{orthanc.url}/dicom-web"}}
queries:
  - name: last-weeks
    filters: {{PatientID: "TRL00*", StudyDate: {{last: 3w}}}}
storage:
  root: ./data
""")
    root = tmp_path / "data"
    acc1003 = COHORT_ACCESSIONS["ACC1003"].study_uid  # 2024-01-10
    acc1004 = COHORT_ACCESSIONS["ACC1004"].study_uid  # 2024-01-25

    first = trolley("run", str(manifest), today="2024-01-16")  # 20231226-20240116
    assert first.returncode == 0, first.stderr
    before = stored_studies(root)
    assert set(before) == {acc1003}
    queries = [json.loads(line) for line in first.stderr.splitlines() if '"search.query"' in line]
    assert queries[0]["filters"]["StudyDate"] == "20231226-20240116"

    # a week and a half later the same manifest, unchanged, finds one more study
    later = trolley("run", str(manifest), "--refresh", today="2024-01-31")  # 20240110-20240131
    assert later.returncode == 0, later.stderr
    after = stored_studies(root)
    assert set(after) == {acc1003, acc1004}
    assert after[acc1003] == before[acc1003]  # done before: not fetched again
    done = [json.loads(line) for line in later.stderr.splitlines() if '"item.done"' in line]
    assert {event["study_uid"] for event in done} == {acc1004}

    report = json.loads(trolley("report", str(manifest), today="2024-02-01").stdout)
    ranges = [run.get("resolved_dates") for run in report["runs"]]
    assert ranges == [
        {"last-weeks": {"StudyDate": "20231226-20240116"}},
        {"last-weeks": {"StudyDate": "20240110-20240131"}},
    ]

    locked = trolley("lock", str(manifest), today="2024-01-31")
    assert locked.returncode == 0, locked.stderr
    lock = json.loads((tmp_path / "recent.yaml.lock.json").read_text())
    assert lock["resolved_dates"] == {"last-weeks": {"StudyDate": "20240110-20240131"}}
    assert lock["totals"]["studies"] == 2
