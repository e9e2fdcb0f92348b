"""Exit 0 means the cohort is complete: against a real Orthanc (and a proxy that loses parts).

Each unit carries what the archive said it holds; a shortfall makes it `incomplete` (exit 1,
the missing SOPInstanceUIDs named); a CSV row that matches nothing fails the run; `select`
drops are reported; a killed run is `aborted`, not `running`; a layout change is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import COHORT_ACCESSIONS, standard_cohort
from trolley_etl._harness.proxy import FaultProxy

COHORT = standard_cohort()


def instances_of(accession: str) -> set[str]:
    study_uid = COHORT_ACCESSIONS[accession].study_uid
    return {c.sop_uid for c in COHORT if c.study_uid == study_uid}


def write_manifest(
    folder: Path,
    search_url: str,
    download_url: str,
    accessions: list[str],
    *,
    extra: str = "",
    query_extra: str = "",
    retries: int = 1,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cohort.csv").write_text("AccessionNumber\n" + "\n".join(accessions) + "\n")
    path = folder / "pull.yaml"
    path.write_text(
        f"""\
version: 1
name: completeness-test
source:
  search: {{backend: qido-rs, url: "{search_url}/dicom-web"}}
  download: {{backend: wado-rs, url: "{download_url}/dicom-web"}}
queries:
  - name: cohort
    from_csv: {{path: cohort.csv, column: AccessionNumber}}
{query_extra}storage:
  root: ./data
run:
  workers: 2
  retries: {retries}
{extra}"""
    )
    return path


def trolley(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def report_of(root: Path) -> dict:
    reports = sorted((root / ".trolley" / "reports").glob("2*.json"))
    return json.loads(reports[-1].read_text())


def test_proxy_that_drops_a_part_makes_the_unit_incomplete(orthanc, tmp_path) -> None:
    short, whole = "ACC1001", "ACC1003"
    short_uid = COHORT_ACCESSIONS[short].study_uid
    proxy = FaultProxy(orthanc.url)
    proxy.drop_one_part = True
    proxy.drop_prefix = f"/dicom-web/studies/{short_uid}"
    try:
        manifest = write_manifest(tmp_path, orthanc.url, proxy.url, [short, whole])
        first = trolley("run", str(manifest))
        assert first.returncode == 1, first.stderr
        assert proxy.dropped, "the proxy never dropped a part"
        prefix = "incomplete: "
        lines = [
            json.loads(line.removeprefix(prefix))
            for line in first.stderr.splitlines()
            if line.startswith(prefix)
        ]
        assert len(lines) == 1 and lines[0]["study_uid"] == short_uid
        expected = instances_of(short)
        missing = lines[0]["missing_uids"]
        assert len(missing) == 1 and missing[0] in expected
        assert lines[0]["expected_instances"] == len(expected)
        assert lines[0]["stored_instances"] == len(expected) - 1
        # retried like a failure first, then reported with its missing instance
        logged = events(first.stderr)
        mine = [e["event"] for e in logged if e.get("study_uid") == short_uid]
        item_events = [name for name in mine if name.startswith("item.")]
        assert item_events == ["item.retry", "item.incomplete"]

        root = tmp_path / "data"
        report = report_of(root)
        assert report["status"] == "incomplete"
        study = report["summary"]["by_study"][short_uid]
        assert study["expected_instances"] == len(expected)
        assert study["stored_instances"] == len(expected) - 1
        assert report["cohort"]["cohort"]["incomplete"] == 1
        assert report["cohort"]["cohort"]["stored"] == 1
        # the run's own report lists what is not stored; `report` has every instance
        [row] = [r for r in report["not_stored"] if r["status"] == "incomplete"]
        assert row["sop_instance_uid"] == missing[0]

        status = trolley("status", str(manifest), "--format", "json")
        assert status.returncode == 1
        shown = json.loads(status.stdout)
        assert shown["counts"]["incomplete"] == 1
        assert shown["incomplete"][0]["missing_uids"] == missing

        # the proxy behaves again: the rerun fetches the incomplete unit only, and completes
        proxy.drop_one_part = False
        rerun = trolley("run", str(manifest))
        assert rerun.returncode == 0, rerun.stderr
        done = [e for e in events(rerun.stderr) if e["event"] == "item.done"]
        assert [e["study_uid"] for e in done] == [short_uid]
        assert done[0]["stored_instances"] == len(expected)
        assert trolley("status", str(manifest)).returncode == 0
    finally:
        proxy.close()


def test_csv_row_matching_nothing_fails_the_run_and_is_named(orthanc, tmp_path) -> None:
    manifest = write_manifest(tmp_path, orthanc.url, orthanc.url, ["ACC1004", "NOSUCH42"])
    run = trolley("run", str(manifest))
    assert run.returncode == 1, run.stderr
    assert 'unmatched: {"query_set": "cohort", "row": 3, "value": "NOSUCH42"}' in run.stderr
    cohort = report_of(tmp_path / "data")["cohort"]["cohort"]
    assert cohort["requested"] == 2 and cohort["matched"] == 1
    assert cohort["unmatched"] == [{"row": 3, "value": "NOSUCH42"}]
    assert cohort["studies_found"] == 1 and cohort["stored"] == 1
    status = trolley("status", str(manifest), "--format", "json")
    assert status.returncode == 1
    assert json.loads(status.stdout)["unmatched"] == [
        {"query_set": "cohort", "row": 3, "value": "NOSUCH42"}
    ]

    # allow_unmatched: reported, not fatal; the checkpoint stays valid (nothing else changed)
    text = manifest.read_text().replace(
        "column: AccessionNumber}\n", "column: AccessionNumber}\n    allow_unmatched: true\n"
    )
    manifest.write_text(text)
    allowed = trolley("run", str(manifest))
    assert allowed.returncode == 0, allowed.stderr
    cohort = report_of(tmp_path / "data")["cohort"]["cohort"]
    assert cohort["unmatched"] == [{"row": 3, "value": "NOSUCH42"}]
    assert trolley("status", str(manifest)).returncode == 0


def test_select_drops_are_reported_with_their_rule(orthanc, tmp_path) -> None:
    # ACC1003 is CT + MR, ACC1005 is MR only: keeping CT drops one series and one study
    select = "select:\n  series: {Modality: CT}\n"
    manifest = write_manifest(
        tmp_path, orthanc.url, orthanc.url, ["ACC1003", "ACC1005"], query_extra=select
    )
    run = trolley("run", str(manifest))
    assert run.returncode == 0, run.stderr
    cohort = report_of(tmp_path / "data")["cohort"]["cohort"]
    assert cohort["studies_found"] == 2
    dropped = cohort["dropped_by_select"]
    mixed, mr_only = COHORT_ACCESSIONS["ACC1003"], COHORT_ACCESSIONS["ACC1005"]
    assert {(d["level"], d["study_uid"], d["series_uid"]) for d in dropped} == {
        ("series", mixed.study_uid, mixed.series_uid(1)),
        ("study", mr_only.study_uid, ""),
        ("series", mr_only.study_uid, mr_only.series_uid(0)),
        ("series", mr_only.study_uid, mr_only.series_uid(1)),
    }
    assert {d["rule"] for d in dropped} == {"select.series: Modality=CT"}
    assert cohort["units_planned"] == 1 and cohort["stored"] == 1


def test_killed_run_is_aborted_not_running(orthanc, tmp_path) -> None:
    manifest = write_manifest(tmp_path, orthanc.url, orthanc.url, ["ACC1001"])
    killed = trolley("run", str(manifest), env={"TROLLEY_ETL_CRASH_AT": "after-resolution:1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    status = trolley("status", str(manifest), "--format", "json")
    assert status.returncode == 1
    assert json.loads(status.stdout)["last_run"]["status"] == "aborted"
    text = trolley("status", str(manifest))
    assert "aborted" in text.stdout and text.returncode == 1


@pytest.mark.subprocess
def test_unreachable_archive_at_start_leaves_an_aborted_run_and_an_empty_root(tmp_path) -> None:
    from trolley_etl._harness.orthanc import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    manifest = write_manifest(tmp_path, dead, dead, ["ACC1001"], extra="")
    run = trolley("run", str(manifest))
    assert run.returncode == 3, run.stderr
    status = trolley("status", str(manifest), "--format", "json")
    assert status.returncode == 1  # a root that holds nothing is never "ok"
    shown = json.loads(status.stdout)
    assert shown["last_run"]["status"] == "aborted" and shown["empty"] is True


NEW_LAYOUT = '  layout: "{PatientID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"\n'


def stored_paths(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix() for p in root.rglob("*.dcm") if ".trolley" not in p.parts
    }


def test_layout_change_moves_stored_files_with_refresh(orthanc, tmp_path) -> None:
    manifest = write_manifest(tmp_path, orthanc.url, orthanc.url, ["ACC1004", "ACC1005"])
    assert trolley("run", str(manifest)).returncode == 0
    root = tmp_path / "data"
    before = stored_paths(root)
    manifest.write_text(
        manifest.read_text().replace("  root: ./data\n", "  root: ./data\n" + NEW_LAYOUT)
    )
    refused = trolley("run", str(manifest), "--log-format", "console")
    assert refused.returncode == 2 and "--refresh" in refused.stderr
    assert "Traceback" not in refused.stderr and stored_paths(root) == before

    moved = trolley("run", str(manifest), "--refresh")
    assert moved.returncode == 0, moved.stderr
    relayout = [e for e in events(moved.stderr) if e["event"] == "storage.relayout"]
    assert relayout and relayout[0]["moved"] == len(before)
    assert not [e for e in events(moved.stderr) if e["event"] == "item.done"]  # nothing fetched
    after = stored_paths(root)
    assert len(after) == len(before) and after.isdisjoint(before)
    assert all(path.startswith("TRL00") for path in after)
    assert not (root / next(iter(before)).split("/")[0]).exists()  # old folders removed
    assert trolley("verify", str(manifest)).returncode == 0


def test_layout_move_killed_midway_resumes_with_refresh(orthanc, tmp_path) -> None:
    manifest = write_manifest(tmp_path, orthanc.url, orthanc.url, ["ACC1001"])
    assert trolley("run", str(manifest)).returncode == 0
    root = tmp_path / "data"
    count = len(stored_paths(root))
    manifest.write_text(
        manifest.read_text().replace("  root: ./data\n", "  root: ./data\n" + NEW_LAYOUT)
    )
    killed = trolley(
        "run", str(manifest), "--refresh", env={"TROLLEY_ETL_CRASH_AT": "after-move:3"}
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert trolley("verify", str(manifest)).returncode == 1  # half moved: verify says so
    resumed = trolley("run", str(manifest), "--refresh")
    assert resumed.returncode == 0, resumed.stderr
    after = stored_paths(root)
    assert len(after) == count and all(path.startswith("TRL001/") for path in after)
    assert trolley("verify", str(manifest)).returncode == 0


@pytest.mark.parametrize("completeness", ["strict", "off"])
def test_completeness_setting_is_accepted(orthanc, tmp_path, completeness) -> None:
    manifest = write_manifest(
        tmp_path, orthanc.url, orthanc.url, ["ACC1005"], extra=f"  completeness: {completeness}\n"
    )
    run = trolley("run", str(manifest))
    assert run.returncode == 0, run.stderr
    units = report_of(tmp_path / "data")["units"]
    assert [u["state"] for u in units] == ["done"]
    assert units[0]["stored_instances"] == len(instances_of("ACC1005"))
    if completeness == "strict":
        assert units[0]["expected_instances"] == len(instances_of("ACC1005"))


# --- DIMSE: the archive that retrieves holds less than the one that answered the search -----

SHORT_ACCESSION = "ACC1004"


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """A second Orthanc holding ACC1004 without its last instance (an index out of sync)."""
    from trolley_etl._harness.orthanc import OrthancServer

    study_uid = COHORT_ACCESSIONS[SHORT_ACCESSION].study_uid
    held = [c for c in COHORT if c.study_uid == study_uid]
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-partial"), aet="PARTIAL").start()
    try:
        server.upload_many(c.data for c in held[:-1])
        yield server, held[-1].sop_uid
    finally:
        server.stop()


@pytest.mark.parametrize("method", ["c-get", "c-move"])
def test_dimse_shortfall_is_incomplete_with_the_missing_uid(
    orthanc, partial, tmp_path, method
) -> None:
    from trolley_etl._harness.orthanc import free_port

    server, lost = partial
    download = (
        f"{{backend: {method}, host: 127.0.0.1, port: {server.dicom_port}, "
        f"called_aet: {server.aet}, calling_aet: TROLLEY"
    )
    if method == "c-move":
        port = free_port()
        server.add_modality("TROLLEYDEST", "TROLLEYDEST", "127.0.0.1", port)
        download += f", move_destination: {{aet: TROLLEYDEST, port: {port}}}"
    manifest = tmp_path / "pull.yaml"
    manifest.write_text(f"""\
version: 1
name: dimse-shortfall
source:
  search: {{backend: dicom-qr, host: 127.0.0.1, port: {orthanc.dicom_port},
           called_aet: {orthanc.aet}, calling_aet: TROLLEY}}
  download: {download}}}
queries:
  - name: one
    filters: {{AccessionNumber: {SHORT_ACCESSION}}}
storage:
  root: ./data
run:
  retries: 0
""")
    run = trolley("run", str(manifest))
    assert run.returncode == 1, run.stderr
    [line] = [
        json.loads(x.removeprefix("incomplete: "))
        for x in run.stderr.splitlines()
        if x.startswith("incomplete: ")
    ]
    held = instances_of(SHORT_ACCESSION)
    assert line["expected_instances"] == len(held)
    assert line["stored_instances"] == len(held) - 1
    assert line["missing_uids"] == [lost]
    assert report_of(tmp_path / "data")["status"] == "incomplete"
