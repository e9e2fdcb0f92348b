"""The runner in process over an in-memory archive: completeness, drift, retries, accounting.

The same Runner as `trolley-etl run`, with `trolley_etl.testing` in place of real backends, so that
each behaviour is shown in milliseconds; test_completeness.py shows it against Orthanc.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, standard_cohort
from trolley_etl.manifest import load_manifest
from trolley_etl.runner.checkpoint import ItemState, RunState, open_checkpoint
from trolley_etl.runner.logs import RunLog
from trolley_etl.runner.run import Runner, RunOptions, RunResult
from trolley_etl.testing import FakeArchive
from trolley_etl.testing import run_manifest as run

ACCESSIONS = ("ACC1001", "ACC1003")


@pytest.fixture(scope="module")
def instances():
    uids = {COHORT_ACCESSIONS[a].study_uid for a in ACCESSIONS}
    return [i for i in standard_cohort() if i.study_uid in uids]


def write_manifest(
    folder: Path, rows: tuple[str, ...] = ACCESSIONS, *, run: str = "", query: str = ""
) -> Path:
    (folder / "cohort.csv").write_text("AccessionNumber\n" + "\n".join(rows) + "\n")
    path = folder / "pull.yaml"
    path.write_text(f"""\
version: 1
name: fast
source:
  search: {{backend: qido-rs, url: "http://127.0.0.1:9/dicom-web"}}
queries:
  - name: cohort
    from_csv: {{path: cohort.csv, column: AccessionNumber}}
{query}storage:
  root: ./data
run:
  workers: 2
  retries: 1
{run}""")
    return path


def items(manifest: Path):
    checkpoint = open_checkpoint(manifest.parent / "data")
    try:
        return checkpoint.items()
    finally:
        checkpoint.close()


def report(result: RunResult) -> dict:
    assert result.report_path is not None
    return json.loads(result.report_path.read_text())


def test_complete_run_records_expected_and_stored(tmp_path, instances) -> None:
    archive = FakeArchive(instances)
    result = run(write_manifest(tmp_path), archive)
    assert result.status == RunState.COMPLETE.value
    units = items(tmp_path / "pull.yaml")
    assert {u.state for u in units} == {ItemState.DONE.value}
    for unit in units:
        held = sum(1 for i in instances if i.study_uid == unit.reference.study_uid)
        assert unit.expected.count == held and unit.stored_instances == held
    by_study = report(result)["summary"]["by_study"]
    assert all(s["expected_instances"] == s["stored_instances"] for s in by_study.values())


def test_lost_instance_is_incomplete_then_rerun_completes_it_only(tmp_path, instances) -> None:
    lost = instances[1]
    archive = FakeArchive(instances, lose={lost.sop_uid})
    manifest = write_manifest(tmp_path)
    result = run(manifest, archive)
    assert result.status == RunState.INCOMPLETE.value
    [short] = result.incomplete
    assert short["study_uid"] == lost.study_uid and short["missing_uids"] == [lost.sop_uid]
    assert short["expected_instances"] == short["stored_instances"] + 1
    assert report(result)["incomplete"] == [short]
    [unit] = [u for u in items(manifest) if u.state == ItemState.INCOMPLETE.value]
    assert unit.missing_uids == (lost.sop_uid,)

    archive.lose.clear()
    archive.fetches.clear()
    again = run(manifest, archive)
    assert again.status == RunState.COMPLETE.value
    assert [ref.study_uid for ref in archive.fetches] == [lost.study_uid]


def test_without_counts_in_answers_the_next_level_is_listed(tmp_path, instances) -> None:
    lost = instances[-1]
    archive = FakeArchive(instances, counts_in_answers=False, lose={lost.sop_uid})
    manifest = write_manifest(tmp_path)
    result = run(manifest, archive)
    assert result.status == RunState.INCOMPLETE.value
    unit = next(u for u in items(manifest) if u.reference.study_uid == lost.study_uid)
    assert unit.expected.uids is not None and lost.sop_uid in unit.expected.uids
    assert unit.missing_uids == (lost.sop_uid,)


def test_completeness_off_takes_units_without_counts_as_they_come(tmp_path, instances) -> None:
    archive = FakeArchive(instances, counts_in_answers=False, lose={instances[0].sop_uid})
    manifest = write_manifest(tmp_path, run="  completeness: off\n")
    result = run(manifest, archive)
    assert result.status == RunState.COMPLETE.value
    assert {u.expected.count for u in items(manifest)} == {None}
    assert not [q for q in archive.searches if q.query_level.value != "study"]


def test_more_instances_than_expected_is_drift_stored_and_counted(tmp_path, instances) -> None:
    late = instances[2]
    archive = FakeArchive(instances, unlisted={late.sop_uid})
    manifest = write_manifest(tmp_path)
    result = run(manifest, archive)
    assert result.status == RunState.COMPLETE.value
    unit = next(u for u in items(manifest) if u.reference.study_uid == late.study_uid)
    assert unit.extra_instances == 1 and unit.stored_instances == unit.expected.count + 1
    assert report(result)["summary"]["archive_drift_instances"] == 1


def test_a_failure_is_retried_then_the_run_completes(tmp_path, instances) -> None:
    archive = FakeArchive(instances, fail_first=1)
    result = run(write_manifest(tmp_path), archive)
    assert result.status == RunState.COMPLETE.value
    assert len(archive.fetches) == len(ACCESSIONS) + 1


def test_unmatched_rows_fail_the_run_unless_allowed(tmp_path, instances) -> None:
    archive = FakeArchive(instances)
    manifest = write_manifest(tmp_path, ("ACC1001", "MISSING1", "ACC1003"))
    result = run(manifest, archive)
    assert result.status == RunState.INCOMPLETE.value
    assert result.unmatched == [{"query_set": "cohort", "row": 3, "value": "MISSING1"}]
    cohort = report(result)["cohort"]["cohort"]
    assert (cohort["requested"], cohort["matched"], cohort["studies_found"]) == (3, 2, 2)
    assert (cohort["units_planned"], cohort["stored"], cohort["incomplete"]) == (2, 2, 0)

    allowed = write_manifest(
        tmp_path, ("ACC1001", "MISSING1", "ACC1003"), query="    allow_unmatched: true\n"
    )
    assert run(allowed, archive).status == RunState.COMPLETE.value


def test_filter_query_finding_nothing_is_a_warning_in_the_report(tmp_path, instances) -> None:
    archive = FakeArchive(instances)
    manifest = write_manifest(tmp_path)
    text = manifest.read_text().replace(
        "    from_csv: {path: cohort.csv, column: AccessionNumber}\n",
        "    from_csv: {path: cohort.csv, column: AccessionNumber}\n"
        "  - name: nothing\n    filters: {PatientID: NOBODY}\n",
    )
    manifest.write_text(text)
    result = run(manifest, archive)
    assert result.status == RunState.COMPLETE.value
    assert report(result)["cohort"]["nothing"]["empty_queries"] == 1


def test_instance_level_units_execute_from_the_stored_plan(tmp_path, instances) -> None:
    archive = FakeArchive(instances, instance_level=True)
    manifest = write_manifest(tmp_path, run="  cache_searches: false\n")  # every search counted
    result = run(manifest, archive)
    assert result.status == RunState.COMPLETE.value
    planned = len(archive.searches)
    assert all(len(u.expected.uids or ()) == u.expected.count for u in items(manifest))
    # executing the units searched nothing more: the instance lists came from the plan
    archive.searches.clear()
    checkpoint = open_checkpoint(tmp_path / "data")
    for unit in checkpoint.items():
        checkpoint.mark_pending(unit.item_id)
    checkpoint.close()
    again = run(manifest, archive)
    assert again.status == RunState.COMPLETE.value and planned > 0
    assert archive.searches == []
    assert {type(ref).__name__ for ref in archive.fetches} == {"SeriesInstances"}
    assert {len(u.reference.series_uid) > 0 for u in items(manifest)} == {True}


@pytest.mark.parametrize("counts_in_lock", [True, False])
def test_locked_study_the_archive_lost_is_never_complete(
    tmp_path, instances, counts_in_lock
) -> None:
    from trolley_etl.runner import lockfile, resolve

    archive = FakeArchive(instances)
    manifest = write_manifest(tmp_path)
    loaded = load_manifest(manifest)
    log = RunLog(log_file=None, stderr_format="json", quiet=True)
    runner = Runner(
        loaded, manifest, log, RunOptions(progress=False, quiet=True), backends=archive.backends
    )  # type: ignore[arg-type]
    runner.plan_only()
    log.close()
    lock = lockfile.Lock.from_resolution(
        loaded.name,
        resolve.resolution_hash(loaded),
        [(f.query_set, f.study.uid) for f in runner.found],
        runner.references,
        runner.planned.expectations if counts_in_lock else None,
    )
    lockfile.write_lock(lockfile.lock_path_for(manifest), lock)
    locked = lock.to_json()["query_sets"]["cohort"]["studies"]
    assert all(("expected_instances" in s) == counts_in_lock for s in locked)

    gone = COHORT_ACCESSIONS["ACC1003"].study_uid
    result = run(manifest, FakeArchive([i for i in instances if i.study_uid != gone]))
    assert result.status == RunState.FAILED.value
    assert [f["study_uid"] for f in result.failed] == [gone]
    assert result.unmatched == [{"query_set": "cohort", "row": 3, "value": "ACC1003"}]


def test_refresh_with_fewer_rows_makes_units_stale_not_fetched(tmp_path, instances) -> None:
    archive = FakeArchive(instances)
    manifest = write_manifest(tmp_path)
    assert run(manifest, archive).status == RunState.COMPLETE.value
    write_manifest(tmp_path, ("ACC1001",))
    archive.fetches.clear()
    result = run(manifest, archive, refresh=True)
    assert result.status == RunState.COMPLETE.value and archive.fetches == []
    states = {u.reference.study_uid: u.state for u in items(manifest)}
    assert states[COHORT_ACCESSIONS["ACC1003"].study_uid] == ItemState.STALE
    cohort = report(result)["cohort"]["cohort"]
    assert (cohort["requested"], cohort["units_planned"], cohort["stored"]) == (1, 1, 1)


def test_units_of_an_older_checkpoint_get_an_expectation_first(tmp_path, instances) -> None:
    import sqlite3

    archive = FakeArchive(instances)
    manifest = write_manifest(tmp_path)
    assert run(manifest, archive).status == RunState.COMPLETE.value
    lost = instances[0]
    database = tmp_path / "data" / ".trolley" / "checkpoint.sqlite"
    db = sqlite3.connect(database)
    with db:  # as an older trolley-etl left it: no expectations, and one file never stored
        db.execute(
            "UPDATE items SET state = 'pending', expected_instances = NULL, "
            "expected_uids = NULL, stored_instances = NULL"
        )
        (path,) = db.execute(
            "SELECT path FROM files WHERE sop_instance_uid = ?", (lost.sop_uid,)
        ).fetchone()
        db.execute("DELETE FROM files WHERE sop_instance_uid = ?", (lost.sop_uid,))
    db.close()
    (tmp_path / "data" / path).unlink()
    archive.lose.add(lost.sop_uid)
    result = run(manifest, archive)
    assert result.status == RunState.INCOMPLETE.value
    assert [u["missing_uids"] for u in result.incomplete] == [[lost.sop_uid]]
